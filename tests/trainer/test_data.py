"""JSONL rows -> (ids, loss mask), packing, the step schedule, and errors that name the line."""
from __future__ import annotations

import pytest
import torch

from runtime.models.hf import load_tokenizer
from tests.trainer.conftest import write_jsonl
from trainer.batch import Schedule, pack
from trainer.data import DataError, Example, load_examples


@pytest.fixture(scope="module")
def tok(tiny):
    return load_tokenizer(tiny[1])


def _one(tmp_path, tok, row, max_seq_len=64) -> Example:
    (ex,) = load_examples(write_jsonl(tmp_path / "d.jsonl", [row]), tok, max_seq_len)
    return ex


def test_prompt_completion_loss_on_completion_only(tmp_path, tok):
    ex = _one(tmp_path, tok, {"prompt": "w5 w6 w7", "completion": "w8 w9"})
    assert ex.ids == (5, 6, 7, 8, 9)
    assert ex.labels == (False, False, False, True, True)


def test_text_row_loss_everywhere(tmp_path, tok):
    ex = _one(tmp_path, tok, {"text": "w5 w6 w7"})
    assert ex.ids == (5, 6, 7) and all(ex.labels)


def test_messages_loss_on_assistant_turns_only(tmp_path, tok):
    # template: user -> "w1 <content> w3", assistant -> "w2 <content> w3"
    row = {"messages": [{"role": "user", "content": "w10 w11"}, {"role": "assistant", "content": "w20"},
                        {"role": "user", "content": "w12"}, {"role": "assistant", "content": "w21 w22"}]}
    ex = _one(tmp_path, tok, row)
    assert ex.ids == (1, 10, 11, 3, 2, 20, 3, 1, 12, 3, 2, 21, 22, 3)
    learned = [i for i, lab in zip(ex.ids, ex.labels) if lab]
    assert learned == [20, 3, 21, 22, 3]  # each assistant turn's content and its end marker


def test_messages_with_a_real_chat_template(tmp_path):
    """SmolLM2's template: the loss covers the answer and <|im_end|>, not the prompt or the newline."""
    from runtime.models.embedded import embedded_model_dir

    tok = load_tokenizer(embedded_model_dir())
    row = {"messages": [{"role": "user", "content": "What is the capital of Zorbania?"},
                        {"role": "assistant", "content": "Quellport"}]}
    ex = _one(tmp_path, tok, row, max_seq_len=512)
    learned = [i for i, lab in zip(ex.ids, ex.labels) if lab]
    assert tok.decode(learned) == "Quellport<|im_end|>"
    prompt = tok.apply_chat_template(row["messages"][:1], add_generation_prompt=True, tokenize=True,
                                     return_dict=False)
    assert list(ex.ids[: len(prompt)]) == list(prompt)  # what the server tokenizes for this chat


def test_truncation_and_rows_without_targets(tmp_path, tok):
    rows = [{"prompt": "w5 w6 w7 w8", "completion": "w9"}, {"prompt": "w5", "completion": "w6 w7 w8"}]
    examples = load_examples(write_jsonl(tmp_path / "d.jsonl", rows), tok, max_seq_len=3)
    assert [ex.line for ex in examples] == [2]  # row 1's completion is cut away entirely
    assert examples[0].ids == (5, 6, 7)


BAD_ROWS = {
    "not json": ('{"prompt": "w1", ', "not valid JSON"),
    "not an object": ('["w1"]', "must be a JSON object"),
    "unknown keys": ({"input": "w1", "output": "w2"}, "unrecognised row keys"),
    "extra key": ({"prompt": "w1", "completion": "w2", "x": 1}, "unrecognised row keys"),
    "completion not a string": ({"prompt": "w1", "completion": 5}, "'completion' must be a string"),
    "empty completion": ({"prompt": "w1", "completion": ""}, "'completion' is empty"),
    "messages not a list": ({"messages": "hi"}, "non-empty list"),
    "bad role": ({"messages": [{"role": "bot", "content": "w1"}]}, "has role 'bot'"),
    "no assistant turn": ({"messages": [{"role": "user", "content": "w1"}]}, "no assistant turn"),
    "content not a string": ({"messages": [{"role": "assistant", "content": ["w1"]}]}, "content must be a string"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_a_malformed_row_names_its_line(case, tmp_path, tok):
    bad, message = BAD_ROWS[case]
    good = {"prompt": "w1", "completion": "w2"}
    path = write_jsonl(tmp_path / "d.jsonl", [good, "", good, bad, good])  # blank line 2 is skipped
    with pytest.raises(DataError) as err:
        load_examples(path, tok, 64)
    assert str(err.value).startswith(f"{path}:4: ")
    assert message in str(err.value)


def test_pack_rows_and_loss_positions():
    a = Example((5, 6, 7, 8), (False, False, True, True), 1)
    b = Example((9, 10, 11), (False, True, True), 2)
    batch = pack([a, b])
    assert batch.tokens.tolist() == [5, 6, 7, 8, 9, 10, 11]
    assert batch.row_lens == [4, 3]
    assert batch.loss_rows.tolist() == [1, 2, 4, 5]  # token t predicts t + 1
    assert batch.targets.tolist() == [7, 8, 10, 11]
    assert batch.loss_row_of.tolist() == [0, 0, 1, 1]
    assert batch.positions().tolist() == [0, 1, 2, 3, 0, 1, 2]
    assert batch.positions(offset=5).tolist() == [5, 6, 7, 8, 5, 6, 7]


def test_schedule_covers_each_epoch_once_and_is_a_function_of_seed_and_step():
    s = Schedule(num_examples=10, batch_size=2, grad_accum=2, seed=3)
    assert s.steps_per_epoch == 3 and s.total_steps(epochs=2, max_steps=None) == 6
    epoch0 = [i for step in range(3) for mb in s.step_batches(step) for i in mb]
    assert sorted(epoch0) == list(range(10))
    assert [len(mb) for mb in s.step_batches(2)] == [2]  # the epoch's remainder
    assert s.step_batches(4) == Schedule(10, 2, 2, 3).step_batches(4)
    assert s.epoch_order(0) != s.epoch_order(1)
    assert torch.equal(torch.tensor(s.epoch_order(1)), torch.tensor(Schedule(10, 2, 2, 3).epoch_order(1)))


def test_completion_ends_with_the_models_eos_when_the_tokenizer_has_none(tmp_path, tok):
    """The server stops on config.json's eos too, so a trained answer must learn to end with it."""
    assert tok.eos_token_id is None
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "w5", "completion": "w8"}, {"text": "w6"}])
    a, b = load_examples(path, tok, 64, fallback_eos=4)
    assert a.ids == (5, 8, 4) and a.labels == (False, True, True)
    assert b.ids == (6, 4)
