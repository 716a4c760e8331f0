"""The one registry idiom: registration, lookup, close-match errors, duplicates refused."""

import pytest

from distill.errors import RecipeError
from distill.registries import Registry


def test_register_get_and_names_keep_order_and_help():
    reg = Registry("loss")

    @reg.register("kl_div")
    def kl_div():
        """Per-sample KL divergence, shape (B,)."""

    @reg.register()
    def mse():
        """Per-sample squared error."""

    assert reg.names() == ["kl_div", "mse"]
    assert reg.get("mse") is mse and reg["kl_div"] is kl_div
    assert "mse" in reg and "l1" not in reg and len(reg) == 2
    assert reg.help("kl_div") == "Per-sample KL divergence, shape (B,)."


def test_unknown_name_is_one_recipe_error_with_close_matches():
    reg = Registry("loss")
    reg.register("kl_div")(lambda: None)
    reg.register("mse")(lambda: None)
    with pytest.raises(RecipeError) as err:
        reg.get("kl_dvi", field="loss.kd")
    msg = str(err.value)
    assert msg == "recipe field 'loss.kd': unknown loss 'kl_dvi' (did you mean: kl_div?); choose one of: kl_div, mse"
    assert "\n" not in msg


def test_duplicate_registration_is_refused():
    reg = Registry("tap")
    reg.register("x")(object)
    with pytest.raises(ValueError, match="tap 'x' registered twice"):
        reg.register("x")(dict)
