"""Optimizer steps cut into pieces (runtime/training/pieces.py, slices.py): any cut gives the
uninterrupted step bit for bit (its eval and checkpoint included), serving between pieces sees
nothing of the job, a budget of zero pauses at every pause point (the projections' and the
trainer's own: the loss's vocabulary slices, clipping's and the optimizer's chunks, the
checkpoint's records), and a step abandoned mid-way (in its checkpoint too) lets go of everything."""
from __future__ import annotations

import threading
from dataclasses import replace

import pytest
import torch

from runtime.models.base import load_base
from runtime.nn.attention import AttentionBatch
from runtime.training.pieces import Abandoned, PiecewiseCall
from runtime.training.slices import ResidentRun, pause_modules
from tests.training.conftest import jsonl, learn_rows
from trainer import TrainConfig
from trainer.loop import Trainer, read_examples

STEPS = 3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("rows") / "learn.jsonl"
    path.write_bytes(jsonl(learn_rows()))
    return path


@pytest.fixture
def base(chat_model_dir):
    return load_base(str(chat_model_dir), "nf4", None, "cpu")  # as quiver serve: fused, merged


def _config(data, tmp_path, **kw) -> TrainConfig:
    return TrainConfig(**{**dict(method="lora", data=str(data), output=str(tmp_path / "out"), rank=4,
                                 max_steps=STEPS, batch_size=4, lr=1e-2, progress=False, seed=0, dropout=0.1),
                          **kw})


def _params(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.method.named_parameters()}


def _run_in_pieces(cfg, base, budget_s: float, between=None) -> tuple[ResidentRun, list[int]]:
    """STEPS optimizer steps; `between()` after every piece (a serving step). Pieces per step."""
    run = ResidentRun(cfg, base, read_examples(cfg, base))
    run.setup()
    pieces = []
    for _ in range(STEPS):
        n = 1
        while run.advance(budget_s) is None:
            n += 1
            if between is not None:
                between(run) if getattr(between, "wants_run", False) else between()
        pieces.append(n)
    return run, pieces


def _paused_in(run: ResidentRun) -> set[str]:
    """The functions on the call's stack while it is paused (or in `outside`)."""
    frame = run._call.frame
    names = set()
    while frame is not None:
        names.add(frame.f_code.co_name)
        frame = frame.f_back
    return names


def _checkpointed(tmp_path, data, name: str, cfg: TrainConfig) -> TrainConfig:
    """`cfg` with an eval every step and a checkpoint every step, into its own output."""
    return replace(cfg, output=str(tmp_path / name), eval_data=str(data), eval_every=1, save_every=1)


def _state(output: str, step: int) -> dict:
    return torch.load(f"{output}/checkpoints/step-{step:06d}/trainer_state.pt", weights_only=True)


@pytest.mark.parametrize("method", ["lora", "dora", "prefix"])
def test_a_step_in_many_pieces_is_the_whole_step_bit_for_bit(method, data, base, tmp_path):
    cfg = _config(data, tmp_path, method=method)
    whole, whole_pieces = _run_in_pieces(cfg, base, float("inf"))
    assert whole_pieces == [1] * STEPS
    ref = _params(whole.trainer)
    whole.close()
    cut, cut_pieces = _run_in_pieces(cfg, base, 0.0)  # a pause at every pause point
    assert min(cut_pieces) > 10
    mine = _params(cut.trainer)
    assert [h[1] for h in cut.trainer.history] == [h[1] for h in whole.trainer.history]
    cut.close()
    offline = Trainer(cfg, base)  # quiver train on the same base, one thread, no pieces
    offline.setup()
    for _ in range(STEPS):
        offline.train_step()
    theirs = _params(offline)
    offline.cleanup()
    for name in ref:
        assert torch.equal(mine[name], ref[name]), name
        assert torch.equal(mine[name], theirs[name]), name


@pytest.mark.parametrize("method", ["lora", "dora", "adalora"])
def test_setup_and_finish_in_many_pieces_are_the_whole_ones_bit_for_bit(method, data, base, tmp_path):
    """A job's setup (the method's deltas, a pause before each) and its finish (the final eval
    and the export, its writes outside) cut at every pause point, serving between the pieces:
    the same initial weights and the same adapter files as run whole, and serving unchanged."""
    from safetensors.torch import load_file

    ids = torch.tensor([5, 6, 7, 8])

    def served() -> torch.Tensor:
        with torch.no_grad():
            return base.model(ids, torch.arange(4), AttentionBatch.without_cache([4]))

    ref_served = served()
    extra = dict(init_r=6, target_r=4, tinit=0, tfinal=1) if method == "adalora" else {}
    cfg = replace(_config(data, tmp_path, method=method, **extra), eval_data=str(data), max_steps=2)
    outs, inits, seen = {}, {}, []
    for name, budget, whole in (("whole", float("inf"), True), ("cut", 0.0, False)):
        run = ResidentRun(cfg, base, read_examples(cfg, base))
        pieces = 1
        while not run.setup(budget, whole):
            seen.append(torch.equal(served(), ref_served))
            pieces += 1
        assert run.ready and (pieces == 1 if whole else pieces > len(run.trainer.method.deltas))
        inits[name] = _params(run.trainer)
        while not run.done:
            run.advance(budget, whole)
        out, pieces = tmp_path / f"adapter-{name}", 1
        while run.finish(out, budget, whole) is None:
            seen.append(torch.equal(served(), ref_served))
            pieces += 1
        assert pieces == 1 if whole else pieces > 10  # the eval's projections, the writes outside
        outs[name] = load_file(out / "adapter_model.safetensors")
        run.close()
    assert seen and all(seen) and not base.model.training
    assert inits["cut"].keys() == inits["whole"].keys()
    assert all(torch.equal(inits["cut"][k], inits["whole"][k]) for k in inits["whole"])
    assert outs["cut"].keys() == outs["whole"].keys()
    assert all(torch.equal(outs["cut"][k], outs["whole"][k]) for k in outs["whole"])


def test_a_step_its_eval_and_checkpoint_in_many_pieces_are_quiver_trains_bit_for_bit(data, base, tmp_path):
    cfg = _config(data, tmp_path)
    whole, _ = _run_in_pieces(_checkpointed(tmp_path, data, "whole", cfg), base, float("inf"))
    whole.close()
    cut, _ = _run_in_pieces(_checkpointed(tmp_path, data, "cut", cfg), base, 0.0)
    assert cut.trainer.eval_history == whole.trainer.eval_history
    cut.close()
    offline = Trainer(_checkpointed(tmp_path, data, "offline", cfg), base)  # quiver train, same base
    offline.setup()
    for _ in range(STEPS):
        offline.advance()
    assert offline.eval_history == whole.trainer.eval_history
    offline.cleanup()
    for name in ("cut", "offline"):
        for step in range(1, STEPS + 1):
            mine, ref = _state(str(tmp_path / name), step), _state(str(tmp_path / "whole"), step)
            assert mine["history"] == ref["history"] and torch.equal(mine["rng"], ref["rng"])
            assert mine["method"].keys() == ref["method"].keys()
            assert all(torch.equal(mine["method"][k], ref["method"][k]) for k in ref["method"]), (name, step)
            for i, s in ref["optimizer"]["state"].items():
                assert all(torch.equal(v, mine["optimizer"]["state"][i][k]) for k, v in s.items()), (name, step)


def test_a_budget_of_zero_pauses_inside_the_loss_clipping_optimizer_and_checkpoint(data, base, tmp_path):
    seen: set[str] = set()

    def between(run):
        seen.update(_paused_in(run))

    between.wants_run = True
    run, _ = _run_in_pieces(_checkpointed(tmp_path, data, "out", _config(data, tmp_path)), base, 0.0, between)
    run.close()
    trainer_parts = {"_logit_chunks", "_block_grad", "_at_grad", "_after",
                     "clip_grad_norm_in_chunks", "step_in_chunks", "loss_and_argmax", "save_in_pieces",
                     "outside"}
    assert trainer_parts <= seen, trainer_parts - seen


def test_serving_between_pieces_sees_nothing_of_the_job(data, base, tmp_path):
    ids = torch.tensor([5, 6, 7, 8])
    model = base.model

    def served() -> torch.Tensor:
        with torch.no_grad():
            return model(ids, torch.arange(4), AttentionBatch.without_cache([4]))

    ref, rng = served(), torch.get_rng_state()
    seen = []

    def between():
        seen.append(torch.equal(served(), ref) and torch.equal(torch.get_rng_state(), rng))

    run, pieces = _run_in_pieces(_config(data, tmp_path), base, 0.0, between)
    assert len(seen) == sum(pieces) - STEPS and all(seen)
    assert not model.training
    run.close()


def test_a_budget_of_zero_pauses_at_every_pause_point(data, base, tmp_path):
    """Forward: before each projection; backward: once each projection input's gradient is done.
    So a budget-0 step has at least as many pieces as the forward has projection calls."""
    calls = []
    handles = [lin.register_forward_pre_hook(lambda m, a: calls.append(1))
               for lin in base.model.adapted_linears().values()]
    run, pieces = _run_in_pieces(_config(data, tmp_path), base, 0.0)
    for h in handles:
        h.remove()
    assert sum(pieces) > len(calls)  # every forward call paused, and backward pauses too
    run.close()


def test_abandoning_a_step_mid_way_gives_the_model_back(data, base, tmp_path):
    linears = base.model.adapted_linears()
    before = {n: lin.lora for n, lin in linears.items()}
    run = ResidentRun(_config(data, tmp_path), base, read_examples(_config(data, tmp_path), base))
    run.setup()
    assert run.advance(0.0) is None and run.mid_step
    run.close()
    assert {n: lin.lora for n, lin in linears.items()} == before
    assert not base.model.training and not run._call.in_flight


def test_abandoning_a_step_in_its_checkpoint_writes_leaves_no_checkpoint(data, base, tmp_path):
    cfg = _checkpointed(tmp_path, data, "out", _config(data, tmp_path))
    run = ResidentRun(cfg, base, read_examples(cfg, base))
    run.setup()
    while run.advance(0.0) is None and "save_in_pieces" not in _paused_in(run):
        pass
    assert run.mid_step and "save_in_pieces" in _paused_in(run)
    run.close()
    assert not (tmp_path / "out" / "checkpoints" / "step-000001").exists()
    assert not base.model.training and not run._call.in_flight


def test_outside_lets_the_engine_thread_go_on_until_it_resumes_the_call():
    call = PiecewiseCall()
    engine_ran = threading.Event()
    order = []

    def fn():
        def io():
            assert engine_ran.wait(10)  # the caller goes on while this blocks
            order.append("io")
            return 5

        value = call.outside(io)
        order.append("after")
        return value

    assert call.run(fn, 10.0) == (False, None)  # handed back before io() finished
    assert call.outside_busy  # (a busy slice does not wait for it: slices.py)
    engine_ran.set()
    assert call.run(fn, 10.0) == (True, 5)
    assert not call.outside_busy
    assert order == ["io", "after"]
    assert call.outside(lambda: 7) == 7  # outside a call: just the call
    call.close()


def test_a_piece_hands_back_before_a_stretch_that_would_overrun_it():
    """The stretch after a pause point is taken to last as long as it did the last time: a piece
    whose budget it would overrun ends at that point, and the next piece runs it."""
    import time

    call = PiecewiseCall()
    ran = []

    def fn():
        call.pause_point("before the long stretch")
        ran.append("long")
        time.sleep(0.2)
        call.pause_point("after it")
        return "done"

    assert call.run(fn, 10.0) == (True, "done")  # learns the stretch: ~0.2 s
    ran.clear()
    t0 = time.perf_counter()
    assert call.run(fn, 0.1) == (False, None)
    assert time.perf_counter() - t0 < 0.1 and ran == []  # ended at the point, within its budget
    assert call.run(fn, 0.1) == (False, None) and ran == ["long"]  # a piece always runs on
    assert call.run(fn, 10.0) == (True, "done")
    call.close()


def test_the_pause_points_hooks_stay_for_a_step_and_go_with_it(data, base, tmp_path):
    cfg = _config(data, tmp_path)
    run = ResidentRun(cfg, base, read_examples(cfg, base))
    run.setup()
    modules = pause_modules(base.model)
    assert run.advance(0.0) is None
    assert all(len(m._forward_hooks) == 1 for m in modules)  # mid-step: installed
    while run.advance(0.0) is None:
        pass
    assert not any(m._forward_hooks for m in modules)  # the step done: gone
    assert run.advance(0.0) is None
    run.close()  # abandoned mid-step: gone too
    assert not any(m._forward_hooks for m in modules)


def test_a_call_raises_in_its_caller_and_the_next_call_runs():
    call = PiecewiseCall()

    def fails():
        call.pause_point()
        raise ValueError("bad row")

    with pytest.raises(ValueError, match="bad row"):
        while not call.run(fails, 0.0)[0]:
            pass
    assert call.run(lambda: 7, 1.0) == (True, 7)
    steps = []

    def long():
        for i in range(5):
            steps.append(i)
            call.pause_point()
        return "done"

    assert call.run(long, 0.0) == (False, None) and steps == [0]
    call.abandon()
    assert not call.in_flight and steps == [0]
    assert issubclass(Abandoned, BaseException) and not issubclass(Abandoned, Exception)
    call.close()


def test_a_call_ended_from_outside_unwinds_without_handing_back_and_gives_the_grad_mode_back():
    """greenlet ends a suspended call by raising GreenletExit in it (its thread ending, say):
    the call unwinds (its `finally` blocks run) and never hands back into whoever ended it."""
    import greenlet

    call = PiecewiseCall()
    unwound = []

    def fn():
        try:
            call.pause_point("first")
            call.pause_point("second")
        finally:
            unwound.append(True)
            call.pause_point("while unwinding")  # must not hand back

    with torch.no_grad():
        assert call.run(fn, 0.0) == (False, None) and call.in_flight
        assert call._glet.throw(greenlet.GreenletExit) is None  # it ran to its end
        assert unwound == [True] and not torch.is_grad_enabled()
