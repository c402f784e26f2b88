"""The DeepSpeed workarounds are version-checked: another DeepSpeed is a clear one-line error."""

import pytest

from limoe_ds.compat import deepspeed as compat


def test_the_installed_deepspeed_is_the_one_the_workarounds_are_for():
    import deepspeed
    assert deepspeed.__version__ == compat.DEEPSPEED_VERSION
    compat.check_version(deepspeed.__version__)


@pytest.mark.parametrize("version", ["0.19.9", "0.20.0", "0.18.5"])
def test_another_deepspeed_version_fails_clearly(version):
    want = rf"deepspeed {version} is installed; .*pip install deepspeed==0\.19\.8"
    with pytest.raises(compat.CompatError, match=want):
        compat.check_version(version)


def test_zero0_clipping_with_expert_parallelism_is_named():
    assert compat.zero0_clipping_problem({"zero_optimization": {"stage": 0}, "gradient_clipping": 1.0}, ep=2)
    assert compat.zero0_clipping_problem({"zero_optimization": {"stage": 1}, "gradient_clipping": 1.0}, ep=2) is None
    assert compat.zero0_clipping_problem({"gradient_clipping": 0.0}, ep=2) is None
    assert compat.zero0_clipping_problem({"gradient_clipping": 1.0}, ep=1) is None
