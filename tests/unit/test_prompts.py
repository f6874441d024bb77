"""Prompts as users write them: a question through the chat template or the plain format, and the
ids that end a completion (`pipeline.model.prompts`)."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import GenerationConfig

from pipeline.config import PromptConfig
from pipeline.model.policy import build_char_tokenizer, build_tiny
from pipeline.model.prompts import PromptFormat, stop_token_ids
from pipeline.rollout.engine import TorchEngine

TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% if thinking is defined and not thinking %}"
            "(no thinking){% endif %}{% endif %}")


@pytest.fixture()
def chat_tok():
    tok = build_char_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


def test_plain_is_bos_then_the_question_when_there_is_no_chat_template():
    tok = build_char_tokenizer()
    fmt = PromptFormat(tok)
    assert fmt.kind == "plain"
    assert fmt.encode(["1+2="]) == [[tok.bos_token_id] + tok.encode("1+2=", add_special_tokens=False)]


def test_plain_puts_the_system_prompt_a_blank_line_before_the_user_template():
    fmt = PromptFormat(build_char_tokenizer(), PromptConfig(template="plain", system="S", user="Q: {question} A:"))
    assert fmt.render("1+2=") == "S\n\nQ: 1+2= A:"


def test_chat_renders_messages_with_the_generation_prompt_and_leaves_other_braces_alone(chat_tok):
    cfg = PromptConfig(system="Be brief.", user="{question}\nPut the answer within \\boxed{}.")
    fmt = PromptFormat(chat_tok, cfg)
    assert fmt.kind == "chat"  # auto: the tokenizer has a template
    assert fmt.messages("1+2=") == [{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "1+2=\nPut the answer within \\boxed{}."}]
    text = "<system>Be brief.</system><user>1+2=\nPut the answer within \\boxed{}.</user><assistant>"
    assert fmt.render("1+2=") == text
    # the template decides the special tokens: no BOS added in front of it
    assert fmt.encode(["1+2="]) == [chat_tok.encode(text, add_special_tokens=False)]


def test_chat_template_kwargs_reach_the_template(chat_tok):
    fmt = PromptFormat(chat_tok, PromptConfig(chat_template_kwargs={"thinking": False}))
    assert fmt.render("7").endswith("<assistant>(no thinking)")


def test_chat_without_a_template_is_an_error_naming_the_fix():
    with pytest.raises(ValueError, match="template = 'plain'"):
        PromptFormat(build_char_tokenizer(), PromptConfig(template="chat"))


def test_user_template_must_hold_the_question():
    with pytest.raises(ValueError, match="question"):
        PromptConfig(user="no placeholder")


def test_stop_ids_are_eos_and_every_generation_config_eos_once():
    tok = build_char_tokenizer()
    eos = tok.eos_token_id
    assert stop_token_ids(tok) == [eos]
    assert stop_token_ids(tok, GenerationConfig(eos_token_id=[eos, 9, 9, 11])) == [eos, 9, 11]
    assert stop_token_ids(tok, GenerationConfig(eos_token_id=12)) == [eos, 12]


def test_torch_engine_ends_a_completion_at_any_stop_id():
    """Every token is an end-of-turn id: each completion is one token long and `stop`."""
    tok = build_char_tokenizer()
    model = build_tiny("qwen2", len(tok), hidden_size=16, layers=1, heads=2, kv_heads=1, intermediate_size=32)
    model.generation_config.eos_token_id = list(range(len(tok)))
    samples = TorchEngine(model, tok, max_new_tokens=5, seed=0).generate(["1+2=", "3-1="], [1.0, 1.0], n=4)
    assert all(len(s.completion_token_ids) == 1 and s.finish_reason == "stop" for s in samples)
    # without those ids the same engine writes longer completions
    model.generation_config.eos_token_id = tok.eos_token_id
    longer = TorchEngine(model, tok, max_new_tokens=5, seed=0).generate(["1+2=", "3-1="], [1.0, 1.0], n=4)
    assert np.mean([len(s.completion_token_ids) for s in longer]) > 1


def test_qwen3_chat_template_opens_the_assistant_turn_and_its_turn_ends_stop(qwen3_tokenizer_dir, tmp_path):
    """The real Qwen3 tokenizer (npm, pinned): a GSM8K question as Qwen3 instruct expects it."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(qwen3_tokenizer_dir)
    assert len(tok) == 151_669 and tok.bos_token_id is None
    cfg = PromptConfig(user="{question}\nPut the final answer within \\boxed{}.",
                       chat_template_kwargs={"enable_thinking": False})
    fmt = PromptFormat(tok, cfg)
    assert fmt.kind == "chat"
    text = fmt.render("What is 6 x 7?")
    assert text == ("<|im_start|>user\nWhat is 6 x 7?\nPut the final answer within \\boxed{}.<|im_end|>\n"
                    "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    ids = fmt.encode(["What is 6 x 7?"])[0]
    im_start, im_end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert ids[0] == im_start and ids.count(im_start) == 2 and ids.count(im_end) == 1  # special tokens, not text
    # A Qwen3 folder's generation_config ends a turn at <|im_end|> and at <|endoftext|>
    assert stop_token_ids(tok, GenerationConfig(eos_token_id=[151645, 151643])) == [151645, 151643]
    assert tok.decode([151645, 151643]) == "<|im_end|><|endoftext|>"


def test_stop_ids_of_a_folder_without_generation_config_come_from_its_config(tmp_path):
    """vLLM and transformers stop at config.json's EOS ids when generation_config.json is absent;
    so must our engines' stop list (else stopped completions would read as cut)."""
    from pipeline.model.prompts import load_generation_config

    tok = build_char_tokenizer()
    model = build_tiny("qwen2", len(tok), hidden_size=16, layers=1, heads=2, kv_heads=1, intermediate_size=32)
    model.config.eos_token_id = [tok.eos_token_id, 9]
    model.config.save_pretrained(tmp_path)
    assert not (tmp_path / "generation_config.json").exists()
    assert stop_token_ids(tok, load_generation_config(tmp_path)) == [tok.eos_token_id, 9]
    assert load_generation_config(tmp_path / "nothing-here") is None


def test_template_variables_cannot_override_what_rlstream_sets():
    with pytest.raises(ValueError, match="add_generation_prompt"):
        PromptConfig(chat_template_kwargs={"add_generation_prompt": False})


def test_an_empty_system_prompt_is_no_system_message(chat_tok):
    assert PromptFormat(chat_tok, PromptConfig(system="")).messages("7") == [{"role": "user", "content": "7"}]
