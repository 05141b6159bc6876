"""The non-finite-loss policy on its own: which batch the next step takes, and when a run may
rewind to its last good checkpoint instead of stopping (the trainer applies it; the end-to-end
behaviour is in tests/test_training.py)."""

from megatron_dyt.training.trainer import NonFiniteGuard, Position


def test_position_from_a_checkpoint():
    assert Position.from_state({"step": 7}) == Position(7, 7, [])  # before data cursors existed
    state = {"step": 7, "data_cursor": 9, "skipped_batches": [3, 8]}
    assert Position.from_state(state) == Position(7, 9, [3, 8])


def test_the_next_batch_moves_past_left_out_ones():
    pos = Position(step=4, cursor=4, skipped=[4, 5, 9])
    assert pos.next_batch() == 6 and pos.cursor == 6
    assert pos.next_batch() == 6  # idempotent until the step is taken
    pos.cursor = 9
    assert pos.next_batch() == 10


def test_rewinds_up_to_the_limit_then_stops():
    guard, pos = NonFiniteGuard(limit=2), Position(step=5, cursor=6)
    assert guard.rewind(pos, "step_0000004")
    assert pos.skipped == [6]
    pos.cursor = 8
    assert guard.rewind(pos, "step_0000004")
    assert pos.skipped == [6, 8]
    pos.cursor = 9
    assert not guard.rewind(pos, "step_0000004")  # limit used up: the run stops
    assert pos.skipped == [6, 8]


def test_no_rewind_without_a_checkpoint_or_with_the_default_limit():
    pos = Position(step=1, cursor=1)
    assert not NonFiniteGuard(limit=3).rewind(pos, None)
    assert not NonFiniteGuard(limit=0).rewind(pos, "step_0000000")
    assert pos.skipped == []
