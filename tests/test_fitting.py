"""How the training stages choose their lr: fixed, lr_find's suggestion, or the documented fallback."""

from kagglecls import fitting
from kagglecls.lr_find import LrFindResult
from kagglecls.params import FitParams, LrFindParams


def test_choose_lr_falls_back_with_a_warning_where_the_sweep_cannot_suggest(monkeypatch, caplog):
    stopped_early = LrFindResult(lrs=[1e-5, 1e-4, 1e-3], losses=[1.0, 1.2, 9.0])  # diverged at step 3
    monkeypatch.setattr(fitting, "lr_find", lambda *arguments, **options: stopped_early)
    fit_params = FitParams(lr="auto", lr_find=LrFindParams(fallback_lr=3e-4))
    chosen = fitting.choose_lr(fit_params, model=None, optimizer=None, loader=None, settings=None, live=None)
    assert chosen == (3e-4, "fallback")
    assert "no suggestion (the sweep stopped after 3 steps, too few to read)" in caplog.text
    assert fitting.choose_lr(
        FitParams(lr=0.01), model=None, optimizer=None, loader=None, settings=None, live=None
    ) == (0.01, "fixed")
