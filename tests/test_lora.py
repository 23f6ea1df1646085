"""LoRA through peft (issue 17, item 1): the update trains only the adapters, the merged policy/ is
the PEFT model, the KL reference is the base with the adapters off, and a LoRA run trains, resumes
and prunes like any other."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import tiny_qwen
from safetensors.torch import load_file
from test_update import POLICY_RESPONSES, make_batch, policy_batch

from aepo_core.config import (
    EXECUTION_ONLY,
    AlgorithmConfig,
    ConfigError,
    LoraConfig,
    TrainerConfig,
    load_config,
)
from aepo_core.core.aepo import ControllerState
from aepo_core.core.update import compute_logprobs, make_optimizer, update_step
from aepo_core.io.lora import (
    AdaptersDisabled,
    adapter_parameter_names,
    merge_into_base,
    save_adapter,
    trainable_lora,
)
from aepo_core.io.models import load_policy, write_policy
from aepo_core.pipeline import stages

pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(autouse=True)
def _float32(monkeypatch):
    # logits are compared at 1e-5: trainer.dtype "auto" must mean float32 even on bf16-capable CPUs
    import aepo_core.core.update as update

    monkeypatch.setattr(update, "cpu_has_native_bf16", lambda: False)


def trained_lora(steps: int = 2, lr: float = 5e-2):
    """A tiny Qwen2 wrapped with new adapters, trained `steps` GRPO steps; (model, optimizer, base state)."""
    base = tiny_qwen()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = trainable_lora(base, LoraConfig(), None, seed=0)
    optimizer = make_optimizer(model, TrainerConfig(lr=lr))
    for _ in range(steps):
        update_step(model, optimizer, policy_batch(), None, AlgorithmConfig(name="grpo"), TrainerConfig(lr=lr),
                    ControllerState(), group_size=2)
    return model, optimizer, before


def test_config_validates_and_defaults_leave_digests_alone():
    cfg = load_config(None, [])
    assert cfg.model.lora.enabled is False and cfg.model.lora.rank == 8 and cfg.model.lora.alpha == 16
    assert tuple(cfg.model.lora.target_modules) == TARGETS
    for bad in ("model.lora.rank=0", "model.lora.dropout=1.0", "model.lora.alpha=0", "model.lora.target_modules=[]",
                "model.lora.target_modules=[q_proj, q_proj]", "model.lora.ranks=4"):
        with pytest.raises(ConfigError, match="model.lora"):
            load_config(None, [bad])
    # at its default the section is left out of every digest: the digests of a config written before it existed
    tree = cfg.model_dump(mode="json")
    del tree["model"]["lora"]
    del tree["algorithm"]["rollout_correction"], tree["algorithm"]["rollout_correction_cap"]  # added later too
    for key in EXECUTION_ONLY:  # execution only: in no digest whatever its value
        section, leaf = key.split(".")
        del tree[section][leaf]
    assert stages.digest_tree(cfg) == tree
    on = load_config(None, ["model.lora.enabled=true"])
    changed = [s for s in stages.STAGES if stages.stage_config_digest(on, s) != stages.stage_config_digest(cfg, s)]
    assert changed == ["rollout", "update", "evaluate"]  # the stages that read `model`
    assert stages.config_digest(on) != stages.config_digest(cfg)


def test_update_trains_only_the_adapters_and_the_optimiser_holds_only_theirs():
    model, optimizer, before = trained_lora()
    names = adapter_parameter_names(model)
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert len(names) == 2 * 7 * 2  # A and B of 7 projections in each of 2 layers
    # every base weight bit-identical (peft names them base_layer inside the wrapped modules)
    base_now = {k.removeprefix("base_model.model.").replace(".base_layer", ""): v
                for k, v in model.state_dict().items() if "lora_" not in k}
    assert base_now.keys() == before.keys()
    assert all(torch.equal(base_now[k], before[k]) for k in before)
    trained = dict(model.named_parameters())
    assert any(trained[n].abs().sum() > 0 for n in names if ".lora_B." in n)  # B started at zero
    # AdamW's moments exist for exactly the adapter parameters
    adapter_params = {id(trained[n]) for n in names}
    assert {id(p) for p in optimizer.state} == adapter_params
    assert sum(p.numel() for p in optimizer.state) == sum(trained[n].numel() for n in names)


def test_merged_policy_gives_the_peft_models_logits(tmp_path, tokenizer):
    model, _, _ = trained_lora()
    model.eval()
    ids = make_batch(POLICY_RESPONSES, [0] * 8, seed=3)
    with torch.no_grad():
        peft_logits = model(input_ids=ids.input_ids, attention_mask=ids.attention_mask).logits
    save_adapter(model, tmp_path / "adapter")
    write_policy(merge_into_base(model), tokenizer, tmp_path / "policy")
    merged = load_policy(tmp_path / "policy").eval()
    assert not any("lora" in k for k in load_file(tmp_path / "policy" / "model.safetensors"))  # a plain HF folder
    with torch.no_grad():
        merged_logits = merged(input_ids=ids.input_ids, attention_mask=ids.attention_mask).logits
    torch.testing.assert_close(merged_logits, peft_logits, atol=1e-5, rtol=0)
    # the saved adapter on a fresh base is the same model again
    again = trainable_lora(tiny_qwen(), LoraConfig(), tmp_path / "adapter", seed=123).eval()
    with torch.no_grad():
        reloaded = again(input_ids=ids.input_ids, attention_mask=ids.attention_mask).logits
    assert torch.equal(reloaded, peft_logits)


def test_kl_reference_is_the_base_with_the_adapters_off():
    model, _, _ = trained_lora()
    batch = policy_batch()
    partition = [[range(len(batch))]]
    ref, _ = compute_logprobs(AdaptersDisabled(model), batch, partition, chunk=64)
    base, _ = compute_logprobs(tiny_qwen().eval(), batch, partition, chunk=64)
    trained, _ = compute_logprobs(model, batch, partition, chunk=64)
    mask = batch.response_mask.bool()
    assert torch.equal(ref[mask], base[mask])  # the frozen base, bit for bit, without a second copy
    assert not torch.allclose(trained[mask], base[mask])  # the adapters were on for the policy
    assert model.training  # compute_logprobs restored the mode through the wrapper
    # a KL step against it: the adapters move away from the base, the base stays
    optimizer = make_optimizer(model, TrainerConfig(lr=5e-2))
    res = update_step(model, optimizer, batch, None, AlgorithmConfig(name="grpo", kl_coef=0.1),
                      TrainerConfig(lr=5e-2), ControllerState(), group_size=2, ref_policy=AdaptersDisabled(model))
    assert res.metrics["loss/kl"] > 0


@pytest.mark.slow
def test_a_lora_run_trains_resumes_and_prunes_its_adapters(base_policy_dir, tmp_path, prefect_harness, tiny_overrides):
    from aepo_core.pipeline.rundir import RunDir
    from flows.train import train

    overrides = tiny_overrides(base_policy_dir, tmp_path) + ["model.lora.enabled=true", "run.keep_optimizer_states=2",
                                                             "run.keep_policies_every=1"]
    result = train(overrides=overrides, iterations=2)
    run = RunDir(result["run_dir"])
    base = load_file(base_policy_dir / "model.safetensors")
    for i in range(2):
        for stage in stages.stages_of(run.config(i), i):
            assert run.manifest(i, stage) is not None and run.damage(i, stage) is None
        folder = run.stage_dir(i, "update")
        adapter = load_file(folder / "adapter" / "adapter_model.safetensors")
        assert adapter and all("lora_A" in k or "lora_B" in k for k in adapter)
        state = torch.load(folder / "optimizer.pt", weights_only=True)["state"]
        assert sum(s["exp_avg"].numel() for s in state.values()) == sum(t.numel() for t in adapter.values())
        merged = load_file(folder / "policy" / "model.safetensors")
        assert merged.keys() == base.keys()
        untouched = [k for k in base if not any(f".{t}." in k for t in TARGETS)]
        assert untouched and all(torch.equal(merged[k], base[k]) for k in untouched)  # embeddings, norms
        assert any(not torch.equal(merged[k], base[k]) for k in base if k not in untouched)
    assert run.manifest(1, "evaluate")["metrics"]["accuracy"] >= 0

    # resume after losing the last update: it is recomputed from iteration 0's adapter and optimiser
    # state, bit-identically, so nothing after it turns stale
    digest = run.manifest(1, "update")["digest"]
    shutil.rmtree(run.stage_dir(1, "update"))
    train(run_dir=result["run_dir"])
    assert run.manifest(1, "update")["digest"] == digest
    assert stages.stale_stages(run) == []

    # a third iteration continues from iteration 1's adapter; retention then drops iteration 0's
    # adapter with its optimiser state (run.keep_optimizer_states=2), and says so
    train(run_dir=result["run_dir"], iterations=3)
    assert (run.stage_dir(2, "update") / "adapter").is_dir()
    assert not (run.stage_dir(0, "update") / "adapter").exists()
    pruned = json.loads((run.stage_dir(0, "update") / "_PRUNED.json").read_text())
    assert {"adapter/", "optimizer.pt"} <= set(pruned)
    assert "run.keep_optimizer_states" in pruned["adapter/"]["setting"]
    from aepo_core.pipeline.retention import PrunedArtifact, pruned_need

    problem = pruned_need(run, 1, "update", ((-1, "update", "adapter/"),))
    assert "iter_0000/update/adapter, which retention pruned" in problem and "keep_optimizer_states" in problem

    # a rerun of the last update (from iteration 1's kept adapter) reproduces it; one that would need
    # iteration 0's pruned adapter is refused before anything changes
    from flows.rerun import rerun_stage

    digest = run.manifest(2, "update")["digest"]
    result = rerun_stage(result["run_dir"], 2, "update")
    assert not result["changed"] and run.manifest(2, "update")["digest"] == digest
    with pytest.raises(PrunedArtifact, match=r"iter_0000/update/(policy|optimizer\.pt|adapter)"):
        rerun_stage(str(run.root), 1, "update")


def test_lora_model_without_the_targets_is_refused():
    with pytest.raises(ValueError, match="not found|Target modules"):
        trainable_lora(tiny_qwen(), LoraConfig(target_modules=["no_such_proj"]), None, seed=0)


def test_adapter_disabled_reference_shares_the_weights():
    model = trainable_lora(tiny_qwen(), LoraConfig(), None, seed=0)
    ref = AdaptersDisabled(model)
    assert {id(p) for p in ref.parameters()} == {id(p) for p in model.parameters()}
    ref.eval()
    assert not model.training
    ref.train()
    assert model.training


def test_gradient_checkpointing_trains_the_adapters():
    # non-reentrant checkpointing through the frozen base: the adapters still get their gradient
    model = trainable_lora(tiny_qwen(), LoraConfig(), None, seed=0)
    trainer = TrainerConfig(lr=5e-2, gradient_checkpointing=True)
    update_step(model, make_optimizer(model, trainer), policy_batch(), None, AlgorithmConfig(name="grpo"), trainer,
                ControllerState(), group_size=2)
    from aepo_core.core.update import is_checkpointing

    assert is_checkpointing(model)
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if ".lora_B." in n)
