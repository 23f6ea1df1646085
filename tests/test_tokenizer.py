from aepo_core.io.prompts import chat_prompt_ids
from aepo_core.task.tokenizer import IM_END


def test_round_trip_and_single_digit_tokens(tokenizer):
    text = "7+15=22, 22+9=31. Answer: 31"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    # every digit is its own token, so the tiny model adds digit by digit
    pieces = [tokenizer.decode([i]) for i in tokenizer.encode("12345")]
    assert pieces == ["1", "2", "3", "4", "5"]


def test_any_text_round_trips(tokenizer):
    text = "Ünïcode ✓ \\boxed{x^2} \t tabs\nnew lines"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_chat_template_and_special_tokens(tokenizer, tmp_path):
    ids = chat_prompt_ids(tokenizer, "Add: 1 2 3")
    text = tokenizer.decode(ids)
    assert text == "<|im_start|>user\nAdd: 1 2 3<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.eos_token == IM_END
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    # saved and reloaded as a standard HF tokenizer, it behaves the same
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert chat_prompt_ids(again, "Add: 1 2 3") == ids
    assert again.eos_token_id == tokenizer.eos_token_id
