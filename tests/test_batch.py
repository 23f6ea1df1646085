import pytest
import torch

from aepo_core.core.batch import SequenceBatch


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


def test_every_field_declares_how_it_travels_with_its_rows():
    import dataclasses

    from aepo_core.core.batch import batch_fields

    names = [f.name for f in dataclasses.fields(SequenceBatch)]
    assert [f.name for f in batch_fields(SequenceBatch)] == names  # none left out
    with pytest.raises(TypeError, match="declares no row kind"):

        @dataclasses.dataclass
        class Undeclared(SequenceBatch):
            note: str = "x"

        batch_fields(Undeclared)


def test_a_new_field_of_each_kind_is_carried_by_every_row_operation():
    import dataclasses

    from aepo_core.core.batch import row_field, row_list_field, scalar_field, token_field

    @dataclasses.dataclass
    class Tagged(SequenceBatch):
        token_tag: torch.Tensor | None = token_field(pad=-1.0, optional=True, default=None)
        row_tag: torch.Tensor | None = row_field(optional=True, default=None)
        names: list[str] = row_list_field(default_factory=list)
        label: str = scalar_field(default="")

    def tagged(base, offset, label):
        b, length = base.input_ids.shape
        return Tagged(
            **{f.name: getattr(base, f.name) for f in dataclasses.fields(SequenceBatch)},
            token_tag=torch.arange(b * length, dtype=torch.float32).view(b, length) + offset,
            row_tag=torch.arange(b) + offset,
            names=[f"{label}{i}" for i in range(b)],
            label=label,
        )

    b = tagged(_batch(), 0, "a")  # 2 rows, L = 5
    with pytest.raises(ValueError, match="row_tag"):
        b.with_fields(row_tag=torch.zeros(3))
    with pytest.raises(ValueError, match="names"):
        b.with_fields(names=["x"])

    s = b.select([1])
    assert isinstance(s, Tagged) and s.label == "a" and s.names == ["a1"]
    assert s.token_tag.tolist() == [[5.0, 6.0, 7.0, 8.0, 9.0]] and s.row_tag.tolist() == [1]
    t = s.trimmed()
    assert isinstance(t, Tagged) and t.token_tag.tolist() == [[5.0, 6.0]] and t.names == ["a1"]
    moved = b.to("cpu")
    assert isinstance(moved, Tagged) and torch.equal(moved.token_tag, b.token_tag) and moved.names == b.names
    joined = SequenceBatch.concat([t, b])
    assert isinstance(joined, Tagged) and joined.label == "a"
    assert joined.token_tag.tolist() == [[5.0, 6.0, -1.0, -1.0, -1.0], [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert joined.row_tag.tolist() == [1, 0, 1] and joined.names == ["a1", "a0", "a1"]
    assert joined.input_ids.tolist() == [[7, 11, 0, 0, 0], [5, 6, 8, 9, 10], [7, 11, 0, 0, 0]]
    with pytest.raises(ValueError, match="either every batch has token_tag"):
        SequenceBatch.concat([b, b.with_fields(token_tag=None)])
    none = SequenceBatch.concat([b.with_fields(token_tag=None), b.with_fields(token_tag=None)])
    assert none.token_tag is None and none.select([0]).token_tag is None
