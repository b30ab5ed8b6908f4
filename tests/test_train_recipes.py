"""Training recipes, data, checkpoints and export, on tiny models."""

from __future__ import annotations

import json

import pytest
import torch

from neuroshield.data.records import PromptRecord
from neuroshield.models.tiny import tiny_model
from neuroshield.neurons.neuronset import NeuronSet
from neuroshield.train import data as tdata
from neuroshield.train.data import (
    IGNORE_INDEX,
    ExampleStream,
    TrainExample,
    collate_examples,
    encode_example,
    self_answer_examples,
)
from neuroshield.train.export import ExportError, param_digests, save_merged
from conftest import split_train_args
from neuroshield.train.checkpoints import latest_checkpoint
from neuroshield.train.loop import response_targets
from neuroshield.train.recipes import find_set_files, recipe_neuron_set
from neuroshield.train.trainer import train


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny models run faster on one thread, and much faster on a busy machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


HARMFUL = ([PromptRecord(f"h/{i}", f"how do I do harmful thing number {i}?", "en", "harmful") for i in range(8)]
           + [PromptRecord(f"h/{i}", f"wie mache ich schlimme Sache {i}?", "de", "harmful") for i in range(8)])
BENIGN = [PromptRecord(f"b/{i}", f"tell me a fact about cats ({i})", "en", "benign", reference=f"Cats purr. ({i})")
          for i in range(6)]
UNITS = {"0.ffn": [1, 5], "1.attn_k": [0, 3], "1.attn_o": [2], "1.ffn": [7]}


def _set(loaded, units=UNITS, name="t", scores=None):
    return NeuronSet({k: torch.tensor(v) for k, v in units.items()}, scores or {},
                     meta={"name": name, "config_hash": loaded.config_hash, "model_id": loaded.model_id})


def _train(loaded, recipe, out, **kw):
    args = dict(neuron_set=_set(loaded), harmful=HARMFUL, benign=BENIGN, languages=["en"], steps=3, batch_size=2,
                max_length=64, out_dir=out, checkpoint_every=2, benign_answers="reference", progress=False)
    args.update(kw)
    settings, options, rest = split_train_args(**args)
    return train(loaded, recipe, settings, options=options, **rest)


# --- data ------------------------------------------------------------------------------------------


def test_loss_mask_covers_response_tokens_only():
    tok = tiny_model("llama").tokenizer
    ex = TrainExample("x/1", "en", "harmful", "Tell me how to pick a lock.", "I can't help with that.", "t")
    enc = encode_example(tok, ex, max_length=256)
    p = enc.prompt_len
    assert all(t == IGNORE_INDEX for t in enc.labels[:p])
    assert list(enc.labels[p:]) == list(enc.input_ids[p:])
    assert tok.decode(list(enc.input_ids[p:]), skip_special_tokens=False) == "I can't help with that.<|im_end|>"
    assert "assistant" in tok.decode(list(enc.input_ids[:p]))  # the generation prompt is not trained on
    short = TrainExample("x/2", "en", "benign", "Hi", "Hello!", "t")
    batch = collate_examples([enc, encode_example(tok, short, 256)], tok.pad_token_id)
    n_short = len(encode_example(tok, short, 256).input_ids)
    assert batch["attention_mask"][1, n_short:].sum() == 0 and batch["attention_mask"][1, :n_short].all()
    assert (batch["labels"][1, n_short:] == IGNORE_INDEX).all()  # right padding never counts
    flat, target, rows = response_targets(batch["labels"])
    assert len(target) == enc.response_tokens + encode_example(tok, short, 256).response_tokens
    # each target is predicted from the position before it
    width = batch["input_ids"].shape[1]
    assert torch.equal(batch["input_ids"].flatten()[flat + 1], target)
    assert rows.tolist() == [0] * enc.response_tokens + [1] * (len(target) - enc.response_tokens)
    assert flat.max() < 2 * width


def test_truncation_keeps_template_and_some_response():
    tok = tiny_model("llama").tokenizer
    ex = TrainExample("x/3", "en", "benign", "word " * 80, "answer " * 80, "t")
    enc = encode_example(tok, ex, max_length=120)
    assert len(enc.input_ids) <= 120 and enc.response_tokens >= 16
    assert tok.decode(list(enc.input_ids[:enc.prompt_len])).endswith("<|im_start|>assistant\n")


def test_refusals_are_deterministic_and_parallel():
    ex = tdata.refusal_examples(HARMFUL)
    en = {e.id: e.response for e in ex if e.language == "en"}
    assert en == {e.id: e.response for e in tdata.refusal_examples(HARMFUL) if e.language == "en"}
    from neuroshield.data.templates import refusal_templates

    for e in ex:
        if e.language == "de":
            assert refusal_templates("de").index(e.response) == refusal_templates("en").index(en[e.id])


def test_example_stream_is_deterministic_and_mixed():
    s = ExampleStream(list(range(10)), [f"b{i}" for i in range(4)], benign_fraction=0.5, seed=3)
    first = s.take(0, 40)
    assert first == ExampleStream(list(range(10)), [f"b{i}" for i in range(4)], 0.5, 3).take(0, 40)
    assert sum(isinstance(x, str) for x in first) == 20
    assert sorted(x for x in first[:20] if isinstance(x, int)) == list(range(10))  # one epoch covers all
    assert s.take(17, 5) == first[17:22]


def test_self_answers_are_cached_and_resume(tmp_path, monkeypatch):
    loaded = tiny_model("llama")
    cache = tmp_path / "answers.jsonl"
    recs = BENIGN[:3]
    got = self_answer_examples(loaded, recs, cache, max_new_tokens=3, batch_size=2, progress=False)
    lines = cache.read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(x)["id"] for x in lines)
    import neuroshield.generate.generation as gen

    def boom(*a, **k):
        raise AssertionError("cached answers were generated again")

    monkeypatch.setattr(gen, "generate", boom)
    again = self_answer_examples(loaded, recs, cache, max_new_tokens=3, batch_size=2, progress=False)
    assert [e.response for e in again] == [e.response for e in got]
    # prompts too long for training are not generated at all
    long = [PromptRecord("b/long", "word " * 300, "en", "benign")]
    assert self_answer_examples(loaded, recs + long, cache, max_new_tokens=3, max_prompt_tokens=100,
                                progress=False) == again
    # a different model config must not reuse them; a cut line is ignored
    with open(cache, "a") as f:
        f.write('{"key": "x", "id": "b/9"')
    with pytest.raises(AssertionError, match="generated again"):
        self_answer_examples(tiny_model("llama", layers=3), recs, cache, max_new_tokens=3, progress=False)


# --- neuron sets for the recipes -------------------------------------------------------------------


def test_recipe_sets_from_a_folder(tmp_path):
    loaded = tiny_model("llama", intermediate=256)
    en = _set(loaded, {"0.ffn": [1, 2, 3, 4], "1.ffn": [9]}, "ms_en",
              {"0.ffn": torch.tensor([4.0, 3.0, 2.0, 1.0]), "1.ffn": torch.tensor([5.0])})
    de = _set(loaded, {"0.ffn": [3, 50], "1.attn_q": [0]}, "ms_de",
              {"0.ffn": torch.tensor([1.0, 6.0]), "1.attn_q": torch.tensor([0.5])})
    en.save(tmp_path / "ms_en", loaded)
    de.save(tmp_path / "ms_de", loaded)
    assert [p.name for p in find_set_files(tmp_path)] == ["ms_de.safetensors", "ms_en.safetensors"]
    full = recipe_neuron_set("precise-shield", loaded, tmp_path, budget=None)
    assert full.as_tuples() == en.as_tuples() | de.as_tuples()
    from neuroshield.models.sites import count_parameters

    budget = 3 * 3 * 32 / count_parameters(loaded.model)  # room for three FFN neurons (3 x 32 each)
    trimmed = recipe_neuron_set("precise-shield", loaded, tmp_path, budget=budget)
    assert trimmed.owned_parameters(loaded) <= budget * count_parameters(loaded.model) + 1e-6
    assert 0 < len(trimmed) < len(full)
    ss = recipe_neuron_set("ss-expansion", loaded, tmp_path)
    assert ss.as_tuples() == en.as_tuples()
    rnd = recipe_neuron_set("random", loaded, tmp_path, like="ss-expansion", seed=1)
    assert {k: len(v) for k, v in rnd.units.items()} == {k: len(v) for k, v in en.units.items()}
    assert rnd.as_tuples() != en.as_tuples()
    with pytest.raises(FileNotFoundError, match="ms_fr"):
        find_set_files(tmp_path, ["fr"])


# --- training --------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["precise-shield", "random", "lora", "full"])
def test_each_recipe_runs_and_exports(recipe, tmp_path):
    from transformers import AutoModelForCausalLM

    loaded = tiny_model("qwen2", tie_word_embeddings=(recipe == "full"))
    base = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    res = _train(loaded, recipe, tmp_path, steps=1)
    assert res.steps_done == 1 and res.final_loss is not None and res.losses[0]["tokens"] > 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["recipe"] == recipe and (tmp_path / "loss.png").is_file()
    changed = [k for k, v in loaded.model.state_dict().items() if not torch.equal(v, base[k])]
    assert changed, "training changed nothing"
    if recipe in ("precise-shield", "random"):
        assert res.trainable_parameters == res.parameters_updated == _set(loaded).owned_parameters(loaded)
        assert res.patch and (tmp_path / "neurons.safetensors").is_file()
        if recipe == "random":
            picked = NeuronSet.load(tmp_path / "neurons", loaded)
            assert picked.as_tuples() != _set(loaded).as_tuples()
            assert {k: len(v) for k, v in picked.units.items()} == {k: len(v) for k, v in _set(loaded).units.items()}
    if recipe == "lora":
        assert 0 < res.trainable_parameters < res.parameters_updated < res.total_parameters
        assert all(("proj" in k) for k in changed)
    if recipe == "full":
        assert res.parameters_updated == res.total_parameters
    # the merged checkpoint reloads in plain transformers with identical logits
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    ids = torch.randint(0, 250, (2, 9))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, loaded.model(ids).logits)
    assert not any(p.requires_grad for p in loaded.model.parameters())


def test_interrupt_and_resume_equals_uninterrupted(tmp_path):
    a = tiny_model("qwen2")
    _train(a, "precise-shield", tmp_path / "a", steps=6, export=False, weight_decay=0.1)

    def stop_at_3(step, rec):
        if step == 3:
            raise KeyboardInterrupt

    b = tiny_model("qwen2")
    with pytest.raises(KeyboardInterrupt):
        _train(b, "precise-shield", tmp_path / "b", steps=6, export=False, weight_decay=0.1, on_step=stop_at_3)
    ckpt = latest_checkpoint(tmp_path / "b")
    assert ckpt is not None and ckpt.name == "checkpoint-3"  # Ctrl-C wrote a checkpoint
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["interrupted"] is True
    b = tiny_model("qwen2")  # a fresh process would load the base model again
    res = _train(b, "precise-shield", tmp_path / "b", steps=6, export=False, weight_decay=0.1)
    assert res.resumed_from == 3 and res.steps_done == 6
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    la = json.loads((tmp_path / "a" / "loss.json").read_text())
    lb = json.loads((tmp_path / "b" / "loss.json").read_text())
    assert [x["loss"] for x in la] == [x["loss"] for x in lb]
    from neuroshield.train.patch import read_patch

    pa, pb = read_patch(tmp_path / "a" / "safety_patch.safetensors")[1], read_patch(tmp_path / "b" / "safety_patch.safetensors")[1]
    assert all(torch.equal(x.new, y.new) for x, y in zip(pa, pb))


def test_resume_refuses_a_different_setup(tmp_path):
    _train(tiny_model("qwen2"), "precise-shield", tmp_path, steps=2, export=False)
    with pytest.raises(ValueError, match="different training setup"):
        _train(tiny_model("qwen2"), "precise-shield", tmp_path, steps=4, export=False, lr=0.5)
    res = _train(tiny_model("qwen2"), "precise-shield", tmp_path, steps=2, export=False, lr=0.5, resume=False)
    assert res.resumed_from is None


def test_grad_accum_matches_bigger_batch(tmp_path):
    a, b = tiny_model("qwen2"), tiny_model("qwen2")
    _train(a, "precise-shield", tmp_path / "a", steps=2, batch_size=4, grad_accum=1, export=False, lr=0.05)
    _train(b, "precise-shield", tmp_path / "b", steps=2, batch_size=2, grad_accum=2, export=False, lr=0.05)
    for k, v in a.model.state_dict().items():
        torch.testing.assert_close(b.model.state_dict()[k], v, rtol=1e-4, atol=1e-6)


def test_export_refuses_a_checkpoint_identical_to_base(tmp_path):
    loaded = tiny_model("llama")
    digests = param_digests(loaded.model)
    with pytest.raises(ExportError, match="identical to the base"):
        save_merged(loaded, tmp_path / "m", base_digests=digests)
    with torch.no_grad():
        loaded.model.model.layers[0].mlp.up_proj.weight[3, 0] += 1.0
    with pytest.raises(ExportError, match="do not match the trained"):
        save_merged(loaded, tmp_path / "m", base_digests=digests,
                    expect_changed=["model.layers.1.mlp.up_proj.weight"])
    res = save_merged(loaded, tmp_path / "m", base_digests=digests,
                      expect_changed=["model.layers.0.mlp.up_proj.weight"])
    assert res.tensors_changed == ["model.layers.0.mlp.up_proj.weight"] and res.reload_max_abs_diff is None
    # the opt-in full reload (a second copy of the weights) compares logits
    res = save_merged(loaded, tmp_path / "m", base_digests=digests, reload=True,
                      expect_changed=["model.layers.0.mlp.up_proj.weight"])
    assert res.reload_max_abs_diff == 0.0


def _rewrite_safetensors(folder, edit):
    """Rewrite the folder's weight file with `edit(tensors)` applied (a dict name -> tensor, edited in place)."""
    from safetensors.torch import load_file, save_file

    path = next(folder.glob("*.safetensors"))
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _drop(name):
    return lambda t: t.pop(name)


def _rename(old, new):
    return lambda t: t.__setitem__(new, t.pop(old))


def _reshape(name):
    return lambda t: t.__setitem__(name, t[name][:-1].clone())


def _recast(name):
    return lambda t: t.__setitem__(name, t[name].to(torch.float16))


def _nudge(name):
    def edit(t):
        t[name] = t[name].clone()
        t[name].view(-1)[0] += 1.0
    return edit


@pytest.mark.parametrize("edit, message", [
    (_drop("model.layers.1.mlp.down_proj.weight"), "model.layers.1.mlp.down_proj.weight: missing"),
    (_drop("lm_head.weight"), "lm_head.weight: missing"),
    (_rename("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.query.weight"),
     "model.layers.0.self_attn.query.weight: not a tensor of the model"),
    (_reshape("model.layers.0.mlp.up_proj.weight"), r"model.layers.0.mlp.up_proj.weight: F32\[63, 32\] in the folder"),
    (_recast("model.norm.weight"), r"model.norm.weight: F16\[32\] in the folder, torch.float32\[32\] in memory"),
    (_nudge("model.layers.1.self_attn.o_proj.weight"), "o_proj.weight: values differ from the trained model"),
])
def test_the_structural_check_refuses_a_folder_that_does_not_load_as_the_model(tmp_path, edit, message):
    from neuroshield.train.export import verify_structure

    loaded = tiny_model("qwen2")
    folder = tmp_path / "m"
    save_merged(loaded, folder)  # passes as written
    assert verify_structure(folder, loaded.model) == len(loaded.model.state_dict())
    _rewrite_safetensors(folder, edit)
    with pytest.raises(ExportError, match=f"{folder}: plain transformers would not load it as the trained model"
                       f".*{message}"):
        verify_structure(folder, loaded.model)


def test_the_structural_check_refuses_an_edited_config_and_an_untied_head(tmp_path):
    from neuroshield.train.export import saved_layout, verify_structure

    loaded = tiny_model("qwen2")
    folder = tmp_path / "m"
    save_merged(loaded, folder)
    config = json.loads((folder / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match=f"{folder}: config.json differs from the trained model's config "
                       r"\(1 entries; first: rms_norm_eps: 0.001 in the folder"):
        verify_structure(folder, loaded.model)
    # a model whose head was tied in the config but holds its own values in memory: the folder (head dropped,
    # tied again on load) would not be the trained model
    tied = tiny_model("qwen2", tie_word_embeddings=True)
    save_merged(tied, tmp_path / "t")
    assert "lm_head.weight" not in saved_layout(tmp_path / "t")  # transformers drops the tied head on save
    with torch.no_grad():
        tied.model.lm_head.weight = torch.nn.Parameter(tied.model.lm_head.weight.detach().clone() + 1.0)
    with pytest.raises(ExportError, match="lm_head.weight: tied to model.embed_tokens.weight on load, but differs"):
        save_merged(tied, tmp_path / "t2")
    assert not (tmp_path / "t2").exists()


def test_output_parts_train_only_the_down_columns_of_ffn_neurons(tmp_path):
    loaded = tiny_model("qwen2")
    base = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    units = {"0.ffn": [1, 5], "1.ffn": [7]}
    res = _train(loaded, "precise-shield", tmp_path, steps=2, neuron_set=_set(loaded, units), neuron_parts="output",
                 lr=1e-2, export=False)
    hidden = loaded.model.config.hidden_size
    assert res.trainable_parameters == 3 * hidden  # one down_proj column per neuron
    changed = {k for k, v in loaded.model.state_dict().items() if not torch.equal(v, base[k])}
    assert changed == {"model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"}
    diff = loaded.model.state_dict()["model.layers.0.mlp.down_proj.weight"] != base["model.layers.0.mlp.down_proj.weight"]
    assert set(diff.any(dim=0).nonzero().flatten().tolist()) == {1, 5}
    with pytest.raises(ValueError, match="parts='inputs'"):
        _train(tiny_model("qwen2"), "precise-shield", tmp_path / "bad", neuron_set=_set(loaded, units),
               neuron_parts="inputs")


def test_selected_step_is_the_result(tmp_path):
    """When on_step returns scores, the best-scoring step's weights are the result (patch and merged model),
    also after an interruption and a resume."""
    snaps = {}

    def score(step, rec):
        # remember the merged weights at every scored step; step 2 scores best
        return {2: 1.0, 4: 0.5, 6: 0.2}.get(step)

    def snap(loaded):
        def on_step(step, rec):
            snaps[step] = {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}
            return score(step, rec)
        return on_step

    ref = tiny_model("qwen2")
    _train(ref, "precise-shield", tmp_path / "ref", steps=2, export=False, lr=0.05)  # plain 2-step run
    a = tiny_model("qwen2")
    res = _train(a, "precise-shield", tmp_path / "a", steps=6, export=False, lr=0.05, on_step=snap(a))
    assert res.selected_step == 2
    sr, sa = ref.model.state_dict(), a.model.state_dict()
    assert all(torch.equal(sr[k], sa[k]) for k in sr)  # the result is the step-2 model, not step 6
    from neuroshield.train.patch import read_patch

    meta = read_patch(tmp_path / "a" / "safety_patch.safetensors")[0]
    assert meta.get("steps") in (2, "2")
    hist = json.loads((tmp_path / "a" / "loss.json").read_text())
    assert [h.get("select_score") for h in hist] == [None, 1.0, None, 0.5, None, 0.2]

    def stop_at_5(step, rec):
        if step == 5:
            raise KeyboardInterrupt
        return score(step, rec)

    b = tiny_model("qwen2")
    with pytest.raises(KeyboardInterrupt):
        _train(b, "precise-shield", tmp_path / "b", steps=6, export=False, lr=0.05, on_step=stop_at_5)
    b = tiny_model("qwen2")
    res = _train(b, "precise-shield", tmp_path / "b", steps=6, export=False, lr=0.05, on_step=score)
    assert res.resumed_from == 5 and res.selected_step == 2
    sb = b.model.state_dict()
    assert all(torch.equal(sr[k], sb[k]) for k in sr)
