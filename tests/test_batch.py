import pytest
import torch

from aepo_core.batch import SequenceBatch


def _batch():
    return SequenceBatch.from_token_lists(
        prompt_ids=[[5, 6], [7]],
        response_ids=[[8, 9, 10], [11]],
        pad_id=0,
        rewards=[1.0, 0.0],
        temperatures=[1.0, 1.2],
    )


def test_right_padded_layout():
    b = _batch()
    assert b.input_ids.tolist() == [[5, 6, 8, 9, 10], [7, 11, 0, 0, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert b.response_mask.tolist() == [[0, 0, 1, 1, 1], [0, 1, 0, 0, 0]]
    assert b.rewards.tolist() == [1.0, 0.0]
    assert b.temperatures.tolist() == pytest.approx([1.0, 1.2])
    assert b.roles == ["policy", "policy"] and b.source_index.tolist() == [0, 1]


def test_empty_prompt_rejected_and_shapes_validated():
    with pytest.raises(ValueError):
        SequenceBatch.from_token_lists([[]], [[1]], pad_id=0)
    b = _batch()
    with pytest.raises(ValueError):
        b.with_fields(rewards=torch.zeros(3))


def test_select_and_concat_keep_rows_aligned():
    b = _batch().with_fields(advantages=torch.tensor([[0, 0, 1.0, 1.0, 1.0], [0, -1.0, 0, 0, 0]]))
    flipped = b.select([1, 0])
    assert flipped.input_ids[0].tolist() == [7, 11, 0, 0, 0]
    assert flipped.rewards.tolist() == [0.0, 1.0]
    assert flipped.advantages[0, 1].item() == -1.0
    assert flipped.source_index.tolist() == [1, 0]
    narrow = SequenceBatch.from_token_lists([[3]], [[4]], pad_id=0, rewards=[0.5], temperatures=0.8)
    narrow = narrow.with_fields(advantages=torch.tensor([[0.0, 2.0]]), roles=["reinforce"])
    joined = SequenceBatch.concat([narrow, flipped])
    assert joined.input_ids.tolist() == [[3, 4, 0, 0, 0], [7, 11, 0, 0, 0], [5, 6, 8, 9, 10]]
    assert joined.response_mask.tolist()[0] == [0, 1, 0, 0, 0]
    assert joined.roles == ["reinforce", "policy", "policy"]
    assert joined.temperatures.tolist() == pytest.approx([0.8, 1.2, 1.0])
    assert joined.advantages[0].tolist() == [0.0, 2.0, 0.0, 0.0, 0.0]


def test_trimmed_drops_all_padding_columns():
    b = _batch().select([1])
    t = b.trimmed()
    assert t.input_ids.tolist() == [[7, 11]]
    assert t.response_mask.tolist() == [[0, 1]]
