"""opsd_ray against the peer users would otherwise pick: TRL's SDFT loss (the `peers` extra)."""

import pytest

pytest.importorskip("trl", reason="the peers extra is not installed (make install installs it)")


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_the_standard_loss_equals_trls_full_logit_self_distillation_loss(lam):
    """Same logits, lambda = TRL's distillation_alpha: the same loss and gradient to float32 precision
    (0: forward KL(teacher || student), 1: reverse KL, 0.5: the symmetric JSD)."""
    from opsd_ray.bench.peers import loss_agreement

    got = loss_agreement(lam)
    assert got["loss"] > 0
    assert got["loss_rel_diff"] < 1e-5 and got["grad_rel_diff"] < 1e-4, got


def test_the_pinned_trl_is_the_one_installed():
    import trl

    from opsd_ray.bench.peers import TRL_VERSION

    assert trl.__version__ == TRL_VERSION
