"""Data parallelism: every training stage under Lightning DDP with 2 CPU processes (gloo) against
one process with the same global batch; the samplers' shares; global whitening; the replica check.

Tolerance. With the same global batches the two runs compute the same sums in a different order
(two partial sums all-reduced by gloo vs one sum), so they differ by float32 rounding, ~1e-7
relative per operation, carried through a few optimizer steps. Adam divides by the gradient's
running RMS, so near-zero gradient entries can turn rounding into up to about a step of size lr.
Measured on this machine: SFT and reward weights within 2e-7, PPO weights within 4e-5 (lr 2e-3),
metrics equal to their 6 rounded digits or within 1e-5 relative. The bounds below are far above
rounding and far below what a real error makes: an unsynchronised gradient, whitening or loss
normalised per process, or batches split differently give differences of the order of the
update itself (lr per step) and of the metrics' own spread.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from cqa_rlhf.batches import EvalBatchSampler, LengthGroupedBatchSampler
from cqa_rlhf.data.tables import read_table
from cqa_rlhf.models import CausalLMWithValueHead
from cqa_rlhf.ppo_math import masked_whiten
from cqa_rlhf.training import ReplicaMismatchError, check_replicas, weights_digest

from conftest import run_stage
from helpers import tiny_params

DIGEST = re.compile(r"2 processes hold identical weights \(sha256 ([0-9a-f]{64})\)")


@pytest.fixture(scope="module")
def prepared(prepared_session):
    return prepared_session


# --------------------------------------------------------------------------------------------
# Samplers and maths (no processes)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("drop_last", [False, True])
def test_two_ranks_share_exactly_the_global_batches_of_one_process(drop_last):
    lengths = [(i * 37) % 23 + 1 for i in range(101)]
    one = list(LengthGroupedBatchSampler(lengths, 8, seed=5, drop_last=drop_last))
    ranks = [list(LengthGroupedBatchSampler(lengths, 4, seed=5, rank=r, world_size=2, drop_last=drop_last))
             for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(one)  # every rank steps as often as one process
    for batch, a, b in zip(one, *ranks):
        assert sorted(a + b) == sorted(batch) and not set(a) & set(b)
    assert all(len(b) == 8 for b in one) == drop_last  # 101 items: the tail batch is short


def test_a_tail_batch_smaller_than_the_world_is_dropped():
    # 9 items, global batch 8: the tail has 1 item, fewer than 2 ranks.
    ranks = [list(LengthGroupedBatchSampler([1] * 9, 4, seed=0, rank=r, world_size=2)) for r in range(2)]
    assert [len(b) for b in ranks[0]] == [4] and [len(b) for b in ranks[1]] == [4]


def test_eval_shares_cover_every_item_once_and_every_rank_gets_one():
    lengths = [5, 9, 1, 7, 3]
    one = list(EvalBatchSampler(5, 4, lengths))
    assert one == [[1, 3, 0, 4], [2]]  # longest first
    shares = [list(EvalBatchSampler(5, 4, lengths, rank=r, world_size=2)) for r in range(2)]
    assert shares == [[[1, 0], [2]], [[3, 4]]]
    assert sorted(i for s in shares for b in s for i in b) == list(range(5))


def test_whitening_over_processes_hand_computed():
    x = torch.tensor([[1.0, 2.0, 3.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    # As if a second process held the same three values: mean 2, unbiased variance over the
    # six values (1 + 0 + 1) * 2 / 5 = 0.8.
    both = masked_whiten(x, mask, all_sum=lambda t: 2 * t)
    expected = torch.tensor([[-1.0, 0.0, 1.0, 0.0]]) / math.sqrt(0.8 + 1e-8)
    assert torch.allclose(both, expected, atol=1e-6)
    # One process: exactly the local whitening (variance (1 + 0 + 1) / 2 = 1).
    assert torch.equal(masked_whiten(x, mask, all_sum=lambda t: t), masked_whiten(x, mask))
    assert torch.allclose(masked_whiten(x, mask), torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-6)


def _replicas(rank: int, port: int, differ: bool, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(float(rank) if differ else 0.0)
    try:
        out[rank] = check_replicas(model, 2)
    except ReplicaMismatchError as exc:
        out[rank] = f"mismatch: {exc}"
    dist.destroy_process_group()


@pytest.mark.parametrize("differ", [False, True])
def test_replica_check_across_two_processes(differ):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_replicas, args=(port, differ, out), nprocs=2, join=True)
    if differ:
        assert all(out[r].startswith("mismatch: processes ended the fit with different weights") for r in range(2))
    else:
        assert out[0] == out[1] and re.fullmatch(r"[0-9a-f]{64}", out[0])


# --------------------------------------------------------------------------------------------
# The stages: 2 processes (gloo) against 1 with the same global batch
# --------------------------------------------------------------------------------------------
def _run(module: str, params: dict, work: Path, devices: int, args: tuple[str, ...] = ()):
    work.mkdir(parents=True, exist_ok=True)
    params["trainer"].update(devices=devices, strategy="ddp" if devices > 1 else "auto")
    proc = run_stage(module, params, work, args=args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != "params.yaml"
            and "dvclive" not in p.parts}


def _close(a, b, rel: float, path: str = "") -> None:
    """Metrics ``a`` and ``b`` (nested dicts) equal, numbers within ``rel`` relative."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _close(a[k], b[k], rel, f"{path}.{k}")
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=rel, abs=1e-6), path
    else:
        assert a == b, path


def _max_weight_diff(a: Path, b: Path) -> float:
    x, y = load_file(a), load_file(b)
    assert x.keys() == y.keys()
    return max(float((x[k] - y[k]).abs().max()) for k in x)


def _outs(work: Path, section: dict) -> dict:
    return {**section, "out": str(work / "model"), "metrics": str(work / "metrics.json"),
            "live_dir": str(work / "live"), "checkpoint_dir": str(work / "ckpt")}


def test_sft_on_two_processes_matches_one(tmp_path, prepared):
    assert read_table(prepared / "prepared" / "train" / "sft").num_rows % 8 != 1  # see the reward test
    runs = {}
    for devices, batch in ((1, 8), (2, 4)):
        work = tmp_path / f"d{devices}"
        params = tiny_params(prepared)
        params["sft"] = _outs(work, {**params["sft"], "batch_size": batch, "max_steps": 20})
        runs[devices] = _run("sft", params, work, devices)
    one, two = (json.loads((tmp_path / f"d{d}" / "metrics.json").read_text()) for d in (1, 2))
    _close(one, two, rel=1e-5)
    assert one["val_loss"] < math.log(400)  # it trained (the vocabulary has 400 tokens)
    assert _max_weight_diff(tmp_path / "d1/model/model.safetensors", tmp_path / "d2/model/model.safetensors") < 1e-5
    assert DIGEST.search(runs[2].stderr) and not DIGEST.search(runs[1].stderr)
    assert _files(tmp_path / "d1") == _files(tmp_path / "d2")  # rank 1 wrote nothing of its own


@pytest.mark.long  # outside CI (it would pass 20 minutes): python -m pytest -m long
@pytest.mark.parametrize("kind", ["regression", "classification"])
def test_reward_model_on_two_processes_matches_one(tmp_path, prepared, kind):
    # The same global batches need an epoch's short tail batch to hold >= 2 items (2 processes
    # drop a tail smaller than the world; one process keeps it): 12 leaves a tail of 9 or 4.
    rows = read_table(prepared / "prepared" / "train" / ("reward" if kind == "regression" else "pairs")).num_rows
    assert rows % 12 not in (1,), rows
    for devices, batch in ((1, 12), (2, 6)):
        work = tmp_path / f"d{devices}"
        params = tiny_params(prepared)
        params["reward"] = {kind: _outs(work, {
            "data": str(prepared / "prepared"), "init": "model", "batch_size": batch, "eval_batch_size": 16,
            "max_length": 96, "max_epochs": -1, "max_steps": 16, "val_check_interval": 8, "optim": {"lr": 3e-3},
            # Bradley-Terry alone is blind to a shift of every score (ln_f.bias along the head):
            # that gradient is rounding noise, which Adam turns into steps of ~lr that differ
            # between runs (measured: 1.1e-3 on ln_f.bias, score_mean_sft_train off by 7e-4).
            # The centring term (on by default in params.yaml) gives the shift a real gradient.
            **({"center_coef": 0.01} if kind == "classification" else {})})}
        proc = _run("reward", params, work, devices, args=("--kind", kind))
        assert bool(DIGEST.search(proc.stderr)) == (devices == 2)
    one, two = (json.loads((tmp_path / f"d{d}" / "metrics.json").read_text()) for d in (1, 2))
    _close(one, two, rel=1e-5)
    assert _max_weight_diff(tmp_path / "d1/model/model.safetensors", tmp_path / "d2/model/model.safetensors") < 1e-5
    assert _files(tmp_path / "d1") == _files(tmp_path / "d2")


def test_ppo_on_two_processes_matches_one_and_exports_what_every_rank_holds(tmp_path, prepared, rlhf_inputs):
    """Greedy rollouts (top_k 1) make the answers a function of prompt and weights, so both runs
    roll out the same answers; one minibatch per epoch, accumulated over micro-batches of 8 in
    the single process and split 8 + 8 over the ranks: the same update if losses are token
    means over the global minibatch and advantages are whitened over both ranks' rollouts."""
    lr = 2e-3
    runs = {}
    for devices, batch in ((1, 16), (2, 8)):
        work = tmp_path / f"d{devices}"
        params = tiny_params(prepared)
        params["ppo"] = _outs(work, {
            "data": str(prepared / "prepared"), "sft_dir": str(rlhf_inputs / "sft"),
            "reward_model": str(rlhf_inputs / "rm"), "iterations": 4, "rollout_batch_size": batch,
            "mini_batch_size": batch, "micro_batch_size": 8, "ppo_epochs": 2, "optim": {"lr": lr, "weight_decay": 0.0, "warmup_frac": 0.0}, "max_prompt_length": 48,
            "max_length": 96, "sample": {"max_new_tokens": 16, "batch_size": 16, "top_k": 1}, "eval_every": 2,
            "eval_prompts": 16, "samples_every": 2, "kl": {"beta": 0.02}, "trainer": {"log_every_n_steps": 1}})
        runs[devices] = _run("ppo", params, work, devices)
    one, two = (json.loads((tmp_path / f"d{d}" / "metrics.json").read_text()) for d in (1, 2))
    # The policy moved: its weights, and its answers' log-probs against the reference. (A k1
    # estimate on greedy answers can have either sign: top_k 1 samples the argmax, while the
    # log-probs are those of the full distribution.)
    sft_weights = rlhf_inputs / "sft" / "model.safetensors"
    assert _max_weight_diff(sft_weights, tmp_path / "d1/model/model.safetensors") > lr
    assert abs(one["final"]["kl"]) > 0.05
    _close(one, two, rel=1e-3)
    d1, d2 = tmp_path / "d1/model", tmp_path / "d2/model"
    assert _max_weight_diff(d1 / "model.safetensors", d2 / "model.safetensors") < 0.05 * lr
    assert _max_weight_diff(d1 / "value_head.safetensors", d2 / "value_head.safetensors") < 0.05 * lr
    for name in ("iteration_0000.csv", "iteration_0002.csv", "iteration_0004.csv"):  # held-out: the same answers
        one_rows, two_rows = (pd.read_csv(d / "live/samples" / name) for d in (d1.parent, d2.parent))
        assert one_rows.drop(columns="kl").equals(two_rows.drop(columns="kl")), name
        assert one_rows["kl"].to_numpy() == pytest.approx(two_rows["kl"].to_numpy(), abs=2e-4), name  # a sum of ~16 log-prob differences
    assert _files(tmp_path / "d1") == _files(tmp_path / "d2")
    # Every rank ended with the weights whose digest rank 0 printed; the export is those weights.
    policy = CausalLMWithValueHead(AutoModelForCausalLM.from_pretrained(d2))
    policy.v_head.load_state_dict(load_file(d2 / "value_head.safetensors"))
    assert weights_digest(policy) == DIGEST.search(runs[2].stderr).group(1)


def test_ppo_refuses_a_sharded_strategy(tmp_path, prepared, rlhf_inputs):
    params = tiny_params(prepared)
    params["trainer"]["strategy"] = "fsdp"
    params["ppo"] = _outs(tmp_path, {"data": str(prepared / "prepared"), "sft_dir": str(rlhf_inputs / "sft"),
                                     "reward_model": str(rlhf_inputs / "rm")})
    proc = run_stage("ppo", params, tmp_path)
    assert proc.returncode != 0
    assert "trainer.strategy 'fsdp' shards the policy's weights" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "model").exists() and not (tmp_path / "metrics.json").exists()


@pytest.mark.long  # outside CI (it would pass 20 minutes): python -m pytest -m long
def test_lora_sft_on_two_processes_matches_one(tmp_path, prepared):
    """LoRA adapters (and nothing else) train under DDP as in one process."""
    for devices, batch in ((1, 8), (2, 4)):
        work = tmp_path / f"d{devices}"
        params = tiny_params(prepared)
        params["model"]["lora"] = {"r": 4, "alpha": 8.0, "dropout": 0.0}
        params["sft"] = _outs(work, {**params["sft"], "batch_size": batch, "max_steps": 12})
        _run("sft", params, work, devices)
    one, two = (json.loads((tmp_path / f"d{d}" / "metrics.json").read_text()) for d in (1, 2))
    _close(one, two, rel=1e-5)
    assert one["val_perplexity"] < one["untrained_val_perplexity"]
    assert _max_weight_diff(tmp_path / "d1/model/model.safetensors", tmp_path / "d2/model/model.safetensors") < 1e-5


@pytest.mark.long  # outside CI (it would pass 20 minutes): python -m pytest -m long
def test_dpo_on_two_processes_matches_one(tmp_path, prepared, rlhf_inputs):
    """The same global batches of pairs; each rank computes the reference log-probs of its own
    shares, and the loss is the mean over the global batch's pairs."""
    rows = read_table(prepared / "prepared" / "train" / "pairs").num_rows
    assert rows % 8 not in (1,), rows
    for devices, batch in ((1, 8), (2, 4)):
        work = tmp_path / f"d{devices}"
        params = tiny_params(prepared)
        params["dpo"] = _outs(work, {
            "data": str(prepared / "prepared"), "sft_dir": str(rlhf_inputs / "sft"), "batch_size": batch,
            "eval_batch_size": 16, "score_batch_size": 16, "max_length": 96, "max_epochs": -1, "max_steps": 12,
            "val_check_interval": 6, "optim": {"lr": 2e-3, "weight_decay": 0.0}})
        _run("dpo", params, work, devices)
    one, two = (json.loads((tmp_path / f"d{d}" / "metrics.json").read_text()) for d in (1, 2))
    _close(one, two, rel=1e-5)
    sft_weights = rlhf_inputs / "sft" / "model.safetensors"
    assert _max_weight_diff(sft_weights, tmp_path / "d1/model/model.safetensors") > 1e-3  # it trained
    assert _max_weight_diff(tmp_path / "d1/model/model.safetensors", tmp_path / "d2/model/model.safetensors") < 1e-5
    assert _files(tmp_path / "d1") == _files(tmp_path / "d2")


ONLINE = {  # method -> (its own params, given the prompts a process rolls out; its reward curve)
    "grpo": (lambda batch: {"num_generations": 4, "mini_batch_size": 4 * batch, "micro_batch_size": 4,
                            "grpo_epochs": 2}, "reward"),
    "online_dpo": (lambda batch: {"num_generations": 4, "mini_batch_size": batch, "micro_batch_size": 1,
                                  "dpo_epochs": 2}, "objective/scores"),
}


@pytest.mark.long  # outside CI (it would pass 20 minutes): python -m pytest -m long
@pytest.mark.parametrize("method", sorted(ONLINE))
def test_group_methods_on_two_processes_match_one(tmp_path, prepared, rlhf_inputs, method):
    """GRPO and online DPO: each answer is drawn from its own seed (iteration, question, index),
    so both runs roll out the same answers; groups (and so pairs) live on one rank, losses are
    means over the global minibatch (tokens for GRPO, valid pairs for online DPO)."""
    lr, (own, curve) = 2e-3, ONLINE[method]
    for devices, batch in ((1, 4), (2, 2)):
        work = tmp_path / f"d{devices}"
        params = tiny_params(prepared)
        params[method] = _outs(work, {
            "data": str(prepared / "prepared"), "sft_dir": str(rlhf_inputs / "sft"),
            "reward_model": str(rlhf_inputs / "rm"), "iterations": 4, "rollout_batch_size": batch, **own(batch),
            "optim": {"lr": lr, "weight_decay": 0.0, "warmup_frac": 0.0}, "max_prompt_length": 48, "max_length": 96,
            "sample": {"max_new_tokens": 16, "batch_size": 16}, "eval_every": 2, "eval_prompts": 16, "samples_every": 2,
            "trainer": {"log_every_n_steps": 1}})
        _run(method, params, work, devices)
    one, two = (json.loads((tmp_path / f"d{d}" / "metrics.json").read_text()) for d in (1, 2))
    sft_weights = rlhf_inputs / "sft" / "model.safetensors"
    assert _max_weight_diff(sft_weights, tmp_path / "d1/model/model.safetensors") > lr
    assert abs(one["final"]["kl"]) > 0.05
    _close(one, two, rel=1e-3)
    assert _max_weight_diff(tmp_path / "d1/model/model.safetensors", tmp_path / "d2/model/model.safetensors") < 0.05 * lr
    r1, r2 = ([float(x.split("\t")[1]) for x in (tmp_path / d / f"live/plots/metrics/{curve}.tsv").read_text().splitlines()[1:]]
              for d in ("d1", "d2"))  # the same rollouts: the per-iteration reward curves agree
    assert len(r1) == 4 and r1 == pytest.approx(r2, rel=1e-4)
    assert _files(tmp_path / "d1") == _files(tmp_path / "d2")


# --------------------------------------------------------------------------------------------
# Two nodes on one host: torchrun --nnodes 2, one process each (Lightning's num_nodes: 2)
# --------------------------------------------------------------------------------------------
def _two_nodes(module: str, params: dict, work: Path) -> list:
    """Launch ``module`` as two torchrun "nodes" of one process each, as a user with two
    machines would (``--master-addr`` node 0's address); both nodes get the same params."""
    import socket
    import subprocess
    import sys

    from conftest import stage_env

    work.mkdir(parents=True, exist_ok=True)
    params["trainer"].update(devices=1, num_nodes=2, strategy="ddp")
    (work / "params.yaml").write_text(json.dumps(params), encoding="utf-8")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(rank),
         "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", f"cqa_rlhf.stages.{module}",
         "--params", str(work / "params.yaml")], cwd=work, env=stage_env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return outs


@pytest.mark.long  # outside CI (it would pass 20 minutes): python -m pytest -m long
@pytest.mark.parametrize("stage", ["sft", "ppo"])
def test_two_nodes_equal_two_processes_on_one_node_and_only_node_0_writes(tmp_path, prepared, rlhf_inputs, stage):
    runs = {}
    for name in ("one_node", "two_nodes"):
        work = tmp_path / name
        params = tiny_params(prepared)
        if stage == "sft":
            params["sft"] = _outs(work, {**params["sft"], "batch_size": 4, "max_steps": 12})
        else:
            params["ppo"] = _outs(work, {
                "data": str(prepared / "prepared"), "sft_dir": str(rlhf_inputs / "sft"), "reward_model": str(rlhf_inputs / "rm"),
                "iterations": 2, "rollout_batch_size": 8, "mini_batch_size": 8, "micro_batch_size": 8, "ppo_epochs": 1,
                "max_prompt_length": 48, "max_length": 96, "sample": {"max_new_tokens": 12, "batch_size": 16},
                "eval_every": 2, "eval_prompts": 8, "samples_every": 2})
        runs[name] = _run(stage, params, work, 2) if name == "one_node" else _two_nodes(stage, params, work)
    one, two = tmp_path / "one_node", tmp_path / "two_nodes"
    # the same 2 processes, the same gloo reductions: the same bits, not just close
    assert (one / "metrics.json").read_text() == (two / "metrics.json").read_text()
    assert load_file(one / "model" / "model.safetensors").keys() == load_file(two / "model" / "model.safetensors").keys()
    assert _max_weight_diff(one / "model" / "model.safetensors", two / "model" / "model.safetensors") == 0.0
    assert _files(one) == _files(two)
    (node0_out, node0_err), (node1_out, node1_err) = runs["two_nodes"]
    assert f"{stage}: " in node0_out and f"{stage}: " not in node1_out  # the summary: node 0, rank 0 only
    assert DIGEST.search(node0_err) and not DIGEST.search(node1_err)
