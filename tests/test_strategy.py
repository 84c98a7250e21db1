"""The server's aggregation by example, with train replies built by hand (no Flower run):
FedMergeNet (fusion over FedAvg), fusion over every other Flower strategy, their checks, and
DP and FedProx on the client. The same strategies run for real in test_reliability.py.

Replies carry real 10-class MobileNetV2 state dicts, perturbed differently per client. Without a
fusion unit the result is the bare strategy's to the bit; with one, only the target tensor changes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedmergenet.cli import runner_main, server_main
from fedmergenet.config import STRATEGIES, AdapterConfig, RunConfig, validate
from fedmergenet.errors import ConfigError
from fedmergenet.flower.aggregation import build_strategy, describe
from fedmergenet.flower.client_app import client_dp
from fedmergenet.flower import server_app
from fedmergenet.flower.server_app import sampling
from fedmergenet.flower.strategy import FedMergeNet, MergeNetFusion, in_content_order, spec_of
from fedmergenet.fusion import KnowledgeFusionUnit
from fedmergenet.models import STUDENT_LAYER, build_student
from fedmergenet.training import Proximal, make_optimizer, train_epoch

SMALL_TARGET = "stage1.residual.6.weight"  # [16, 32, 1, 1]: a cheap layer for schedule-only tests


pytestmark = pytest.mark.usefixtures("one_torch_thread", "task_identity")


def client_state(base: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """What one client's training might send back: every float tensor (BatchNorm buffers too) moved."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in base.items():
        if tensor.is_floating_point():
            state[name] = tensor + 0.01 * torch.randn(tensor.shape, generator=g)
        else:  # num_batches_tracked
            state[name] = tensor + seed
    return state


def train_reply(state: dict[str, torch.Tensor], examples, node_id: int, loss: float = 1.0) -> Message:
    """A ClientApp's reply to a train message: one ArrayRecord, one MetricRecord with num-examples."""
    instruction = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=node_id,
                          message_type=MessageType.TRAIN)
    content = RecordDict({"arrays": ArrayRecord(state),
                          "metrics": MetricRecord({"num-examples": examples, "train-loss": loss})})
    return Message(content, reply_to=instruction)


def failed_reply(node_id: int) -> Message:
    instruction = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node_id, message_type=MessageType.TRAIN)
    return Message(Error(code=0, reason="client crashed"), reply_to=instruction)


def sound_replies(base, seeds=(1, 2), examples=(10, 30)) -> list[Message]:
    return [train_reply(client_state(base, s), n, node_id=100 + s, loss=float(s)) for s, n in zip(seeds, examples)]


def fedavg(replies: list[Message]) -> dict[str, np.ndarray]:
    arrays, _ = FedAvg().aggregate_train(1, replies)
    return {k: v.numpy() for k, v in arrays.items()}


def as_numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in arrays.items()}


def differing(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if a[k].dtype != b[k].dtype or not np.array_equal(a[k], b[k])]


def fusion_unit(shape, teacher_rows=10, teacher_cols=2048, mode="replace", **cfg) -> KnowledgeFusionUnit:
    torch.manual_seed(0)
    config = AdapterConfig(mode=mode, **cfg)
    return KnowledgeFusionUnit(torch.randn(teacher_rows, teacher_cols), tuple(shape), config, total_updates=10,
                               device="cpu")


# --- plain averaging ----------------------------------------------------------------------


def test_without_fusion_the_result_is_flowers_fedavg_exactly(base_state):
    """fusion_unit=None: every tensor equals flwr's FedAvg().aggregate_train, bit for bit, same keys."""
    replies = sound_replies(base_state)
    strategy = FedMergeNet(spec=spec_of(base_state))
    arrays, metrics = strategy.aggregate_train(1, iter(replies))  # replies may arrive as a generator
    assert differing(as_numpy(arrays), fedavg(in_content_order(replies))) == []
    assert list(arrays.keys()) == list(base_state.keys())
    assert metrics["train-loss"] == pytest.approx((10 * 1.0 + 30 * 2.0) / 40)
    assert metrics["fusion-applied"] == 0 and metrics["rejected-replies"] == 0
    log = strategy.round_log(1)
    assert (log.replies, log.failures, log.rejected, log.aggregated) == (2, 0, 0, True)


# --- fusion -----------------------------------------------------------------------------------


def test_fusion_starts_at_its_round_changes_only_the_target_and_learns_next_round(base_state):
    """fusion_start_round=2, replace mode (gated would start as the identity):
    round 1 is plain FedAvg; round 2 rewrites STUDENT_LAYER and nothing else (BatchNorm buffers
    included); round 3 first learns from where clients took the fused layer, then fuses again."""
    spec = spec_of(base_state)
    unit = fusion_unit(base_state[STUDENT_LAYER].shape)
    strategy = FedMergeNet(spec=spec, fusion_unit=unit, fusion_start_round=2)

    replies = sound_replies(base_state, seeds=(1, 2))
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert differing(as_numpy(arrays), fedavg(replies)) == []
    assert metrics["fusion-applied"] == 0 and strategy.pending_fused is None

    replies = sound_replies(base_state, seeds=(3, 4))
    arrays, metrics = strategy.aggregate_train(2, replies)
    assert differing(as_numpy(arrays), fedavg(replies)) == [STUDENT_LAYER]
    assert metrics["fusion-applied"] == 1 and "adapter-loss" not in metrics
    fused_round2 = strategy.pending_fused
    assert np.array_equal(fused_round2.numpy(), arrays[STUDENT_LAYER].numpy())
    adapter_before = [p.detach().clone() for p in unit.parameters()]

    replies = sound_replies(base_state, seeds=(5, 6))
    arrays, metrics = strategy.aggregate_train(3, replies)
    averaged = fedavg(replies)
    assert differing(as_numpy(arrays), averaged) == [STUDENT_LAYER]
    assert strategy.round_log(3).learned == 1 and unit.updates == 1
    expected_loss = float(((fused_round2 - torch.from_numpy(averaged[STUDENT_LAYER])) ** 2).mean())
    assert metrics["adapter-loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert any(not torch.equal(a, p) for a, p in zip(adapter_before, unit.parameters()))
    assert strategy.pending_fused is not fused_round2
    assert np.array_equal(strategy.pending_fused.numpy(), arrays[STUDENT_LAYER].numpy())


def test_gated_fusion_first_passes_the_average_through(base_state):
    """Default gated mode on the real layer: the first fused round returns FedAvg's tensors unchanged
    (gate at zero) yet still records a fusion to learn from next round."""
    unit = fusion_unit(base_state[STUDENT_LAYER].shape, mode="gated")
    strategy = FedMergeNet(spec=spec_of(base_state), fusion_unit=unit, fusion_start_round=1)
    replies = sound_replies(base_state)
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert differing(as_numpy(arrays), fedavg(replies)) == []
    assert metrics["fusion-applied"] == 1 and strategy.pending_fused is not None
    assert strategy.round_log(1).gate == 0.0


def test_a_non_finite_fusion_is_skipped_and_the_round_keeps_fedavgs_average(base_state):
    """An adapter gone bad (a NaN in its weights): the round returns FedAvg's tensors, counts the
    skipped fusion in its metrics, has nothing pending to learn from, and the next round runs."""
    unit = fusion_unit(base_state[SMALL_TARGET].shape, teacher_cols=64, h=2)
    with torch.no_grad():
        unit.adapter.layers[0].output.layernorm.weight[0] = float("nan")
    strategy = FedMergeNet(spec=spec_of(base_state), fusion_unit=unit, fusion_start_round=1, target=SMALL_TARGET)
    for server_round in (1, 2):
        replies = sound_replies(base_state, seeds=(server_round, server_round + 10))
        arrays, metrics = strategy.aggregate_train(server_round, replies)
        assert differing(as_numpy(arrays), fedavg(replies)) == []
        assert metrics["fusion-applied"] == 0 and metrics["fusion-skipped"] == 1
        assert strategy.pending_fused is None and strategy.round_log(server_round).learned == 0


def test_fusion_frequency_two_fuses_every_other_round(base_state):
    """fusion_frequency=2 from round 2 fuses in rounds 2 and 4; round 3 only learns (its output is
    plain FedAvg). A small target layer keeps this schedule test cheap."""
    unit = fusion_unit(base_state[SMALL_TARGET].shape, teacher_cols=64, h=2)
    strategy = FedMergeNet(spec=spec_of(base_state), fusion_unit=unit, fusion_start_round=2, fusion_frequency=2,
                           target=SMALL_TARGET)
    assert [r for r in range(1, 8) if strategy.fuses_in(r)] == [2, 4, 6]
    changed = {}
    for server_round in (1, 2, 3, 4):
        replies = sound_replies(base_state, seeds=(server_round, server_round + 10))
        arrays, metrics = strategy.aggregate_train(server_round, replies)
        changed[server_round] = differing(as_numpy(arrays), fedavg(replies))
        assert metrics["fusion-applied"] == (server_round in (2, 4))
    assert changed == {1: [], 2: [SMALL_TARGET], 3: [], 4: [SMALL_TARGET]}
    assert [strategy.round_log(r).learned for r in (1, 2, 3, 4)] == [0, 0, 1, 0]
    assert strategy.pending_fused is not None  # round 4's fusion awaits round 5


def evaluate_reply(stats: dict[str, torch.Tensor], train_examples, node_id: int) -> Message:
    """A ClientApp's reply to an evaluate message that asked for recomputed BatchNorm statistics."""
    instruction = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=node_id,
                          message_type=MessageType.EVALUATE)
    metrics = MetricRecord({"eval-loss": 1.0, "eval-top1": 0.5, "eval-top5": 0.9, "num-examples": 5,
                            "train-examples": train_examples})
    return Message(RecordDict({"bn": ArrayRecord(stats), "metrics": metrics}), reply_to=instruction)


def test_recalibration_pools_the_clients_statistics_into_the_global_model(base_state):
    """The evaluate phase: the model sent out gets the clients' recomputed BatchNorm statistics,
    pooled by their training-set sizes; weights and every other tensor stay as they were. A reply
    with non-finite statistics is left out."""
    strategy = FedMergeNet(spec=spec_of(base_state), recalibrate_bn=True)
    arrays = ArrayRecord({k: v.clone() for k, v in base_state.items()})
    strategy._evaluated = arrays
    names = [k for k in base_state if k.endswith(("running_mean", "running_var"))]
    one = {k: torch.full_like(base_state[k], 1.0) for k in names}
    three = {k: torch.full_like(base_state[k], 3.0) for k in names}
    bad = {k: torch.full_like(base_state[k], float("nan")) for k in names}
    replies = [evaluate_reply(one, 10, 101), evaluate_reply(three, 30, 102), evaluate_reply(bad, 10, 103)]
    strategy.aggregate_evaluate(1, replies)
    assert strategy.round_log(1).bn_recalibrated == 2
    pooled = arrays.to_torch_state_dict()
    mean_name = next(k for k in names if k.endswith("running_mean"))
    var_name = mean_name.replace("running_mean", "running_var")
    assert torch.allclose(pooled[mean_name], torch.full_like(pooled[mean_name], 2.5))  # (10*1 + 30*3) / 40
    # E[x^2] - E[x]^2 with variances 1 and 3 around means 1 and 3: (10*2 + 30*12) / 40 - 2.5^2 = 3.25
    assert torch.allclose(pooled[var_name], torch.full_like(pooled[var_name], 3.25))
    assert all(torch.equal(pooled[k], base_state[k]) for k in base_state if k not in names)


# --- screening -------------------------------------------------------------------------------


def malformed_replies(base) -> dict[int, tuple[Message, str]]:
    """Node id -> (a reply with one defect, words its rejection must contain)."""
    def state(**edits):
        s = client_state(base, 7)
        for name, value in edits.items():
            if value is None:
                del s[name.replace("__", ".")]
            else:
                s[name.replace("__", ".")] = value
        return s

    nan = client_state(base, 7)
    nan[STUDENT_LAYER] = nan[STUDENT_LAYER].clone()
    nan[STUDENT_LAYER][0, 0, 0, 0] = float("nan")
    extra = client_state(base, 7)
    extra["extra.weight"] = torch.zeros(3)
    return {
        1: (train_reply(nan, 10, 1), "NaN"),
        2: (train_reply(state(linear__bias=None), 10, 2), "missing ['linear.bias']"),
        3: (train_reply(extra, 10, 3), "extra ['extra.weight']"),
        4: (train_reply(state(linear__weight=torch.zeros(10, 1279)), 10, 4), "shape (10, 1279)"),
        5: (train_reply(state(linear__weight=base["linear.weight"].double()), 10, 5), "dtype float64"),
        6: (train_reply(client_state(base, 7), 0, 6), "num-examples 0"),
        7: (train_reply(client_state(base, 7), 10**12, 7), "num-examples 1000000000000"),
    }


def test_malformed_replies_are_rejected_with_reasons_and_the_rest_averaged(base_state):
    """NaN, a missing tensor, an extra tensor, a wrong shape, float64 for float32, zero and absurd
    example counts: each is rejected and named in round_log(r).rejections; the result is FedAvg
    over the sound replies only."""
    bad = malformed_replies(base_state)
    good = sound_replies(base_state)
    strategy = FedMergeNet(spec=spec_of(base_state), max_examples=10**6)
    replies = [good[0]] + [msg for msg, _ in bad.values()] + [good[1]]
    arrays, metrics = strategy.aggregate_train(1, replies)

    assert differing(as_numpy(arrays), fedavg(good)) == []
    log = strategy.round_log(1)
    assert (log.replies, log.rejected, log.failures, log.aggregated) == (9, 7, 0, True)
    assert metrics["rejected-replies"] == 7
    assert len(log.rejections) == 7
    for (node, (_, words)), rejection in zip(bad.items(), log.rejections):
        assert rejection.startswith(f"node {node}: "), rejection
        assert words in rejection, (words, rejection)


def test_no_sound_reply_means_no_aggregate(base_state):
    """Only malformed replies and a failure: aggregate_train returns (None, ...), nothing is fused,
    and the round is logged as not aggregated."""
    unit = fusion_unit(base_state[SMALL_TARGET].shape, teacher_cols=64, h=2)
    strategy = FedMergeNet(spec=spec_of(base_state), fusion_unit=unit, fusion_start_round=1, target=SMALL_TARGET)
    replies = [msg for msg, _ in malformed_replies(base_state).values()] + [failed_reply(9)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is None
    log = strategy.round_log(1)
    assert (log.aggregated, log.rejected, log.failures, log.fusion_applied) == (False, 7, 1, 0)
    assert strategy.pending_fused is None and unit.updates == 0


def test_a_reply_carrying_an_error_counts_as_a_failure(base_state):
    """A client that crashed sends an error reply: counted as a failure, not a reply, and ignored."""
    good = sound_replies(base_state)
    strategy = FedMergeNet(spec=spec_of(base_state))
    arrays, _ = strategy.aggregate_train(1, [good[0], failed_reply(9), good[1]])
    assert differing(as_numpy(arrays), fedavg(good)) == []
    log = strategy.round_log(1)
    assert (log.replies, log.failures, log.rejected, log.rejections) == (2, 1, 0, [])


# --- fusion over any Flower strategy ---------------------------------------------------------


class Nodes:
    """All a strategy's configure_* asks of the Grid outside a run: who is connected."""

    def get_node_ids(self) -> list[int]:
        return [101, 102, 103]


def two_rounds(strategy, base_state: dict[str, torch.Tensor]) -> list[dict[str, np.ndarray]]:
    """Configure and aggregate two rounds with the same hand-built replies; the aggregates."""
    arrays, results = ArrayRecord(base_state), []
    for server_round, seeds in ((1, (1, 2, 3)), (2, (4, 5, 6))):
        list(strategy.configure_train(server_round, arrays, ConfigRecord(), Nodes()))
        np.random.seed(server_round)  # the DP wrappers draw their noise from numpy's global generator
        # In the order the wrapper aggregates them, so that Flower's bare strategy sums alike.
        replies = in_content_order(sound_replies(base_state, seeds=seeds, examples=(10, 20, 30)))
        arrays, _ = strategy.aggregate_train(server_round, replies)
        results.append({name: array.numpy() for name, array in arrays.items()})
    return results


@pytest.fixture(scope="module")
def small_state() -> dict[str, torch.Tensor]:
    """A model with a BatchNorm (and its integer counter) small enough to aggregate many times."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 4)).state_dict()


@pytest.mark.parametrize("name", STRATEGIES)
def test_without_fusion_every_strategy_aggregates_exactly_as_flowers_own(name, small_state):
    """The wrapper screens, hands over, and changes nothing: Flower's bare strategy gives the
    same tensors, value for value (integer buffers come back as float64, as FedAvg returns them)."""
    cfg = RunConfig(strategy=name, num_clients=3)
    bare = two_rounds(build_strategy(cfg, sampling(cfg)), small_state)
    wrapped = two_rounds(MergeNetFusion(build_strategy(cfg, sampling(cfg)), spec=spec_of(small_state)), small_state)
    for ours, flowers in zip(wrapped, bare):
        assert list(ours) == list(flowers) == list(small_state)
        for key in ours:
            assert np.array_equal(ours[key], flowers[key]), (name, key)
            assert ours[key].dtype == flowers[key].dtype or "num_batches_tracked" in key


@pytest.mark.parametrize("name", STRATEGIES)
def test_fusion_around_every_strategy_rewrites_only_its_layer_of_the_aggregate(name, small_state):
    """Fusion from round 2 over each of Flower's strategies: round 1 is the strategy's own
    aggregate, round 2 differs from it in the fused layer alone, which stays finite. (The fault
    run in test_reliability.py takes a few of them through the real runtime.)"""
    cfg = RunConfig(strategy=name, num_clients=3)
    target = "0.weight"
    bare = two_rounds(build_strategy(cfg, sampling(cfg)), small_state)
    fused = two_rounds(MergeNetFusion(build_strategy(cfg, sampling(cfg)), spec=spec_of(small_state),
                                      fusion_unit=fusion_unit(small_state[target].shape, teacher_cols=64),
                                      fusion_start_round=2,
                                      target=target), small_state)
    assert [k for k in fused[0] if not np.array_equal(fused[0][k], bare[0][k])] == []
    assert [k for k in fused[1] if not np.array_equal(fused[1][k], bare[1][k])] == [target]
    assert np.isfinite(fused[1][target]).all()


def test_fusion_rewrites_only_its_layer_of_the_strategys_aggregate(base_state):
    """Over FedMedian: the fused aggregate is the median with one layer replaced."""
    cfg = RunConfig(strategy="fedmedian", num_clients=3)
    bare = two_rounds(build_strategy(cfg, sampling(cfg)), base_state)
    unit = fusion_unit(base_state[SMALL_TARGET].shape)
    fused = two_rounds(MergeNetFusion(build_strategy(cfg, sampling(cfg)), spec=spec_of(base_state), fusion_unit=unit,
                                      fusion_start_round=2, target=SMALL_TARGET), base_state)
    assert [k for k in fused[0] if not np.array_equal(fused[0][k], bare[0][k])] == []
    assert [k for k in fused[1] if not np.array_equal(fused[1][k], bare[1][k])] == [SMALL_TARGET]


def test_server_side_dp_clips_every_update_before_fusion_sees_the_aggregate(base_state):
    """Flower's own wrapper, with no noise: each update is clipped to the norm, so the aggregate
    moved at most that far, BatchNorm's integer counters included without a type error."""
    cfg = RunConfig(num_clients=3, dp="server-fixed", dp_noise_multiplier=0.0, dp_clipping_norm=0.5)
    strategy = MergeNetFusion(build_strategy(cfg, sampling(cfg)), spec=spec_of(base_state))
    list(strategy.configure_train(1, ArrayRecord(base_state), ConfigRecord(), Nodes()))
    arrays, _ = strategy.aggregate_train(1, sound_replies(base_state, seeds=(1, 2, 3), examples=(10, 20, 30)))
    moved = np.sqrt(sum(((arrays[k].numpy() - base_state[k].numpy()) ** 2).sum() for k in base_state))
    assert 0.1 < moved <= 0.5 + 1e-6
    assert describe(cfg, strategy.strategy)["dp"] == {"mode": "server-fixed", "noise_multiplier": 0.0,
                                                      "clipping_norm": 0.5, "sampled_clients": 3}


def test_client_side_dp_clips_the_update_and_keeps_the_replys_dtypes(base_state):
    """When the server sends a clipping norm, client_dp runs Flower's fixedclipping_mod around
    training: the reply moved at most the clipping norm from what the server sent, and every
    tensor keeps its dtype for screening."""
    sent = ArrayRecord(base_state)
    msg = Message(RecordDict({"arrays": sent, "config": ConfigRecord({"server-round": 1, KEY_CLIPPING_NORM: 0.5})}),
                  dst_node_id=101, message_type=MessageType.TRAIN)
    trained = sound_replies(base_state, seeds=(1,))[0].content
    context = Context(run_id=1, node_id=101, node_config={}, state=RecordDict(), run_config={})

    reply = client_dp(msg, context, lambda m, c: Message(trained, reply_to=m))
    clipped = reply.content["arrays"].to_torch_state_dict()
    assert {k: v.dtype for k, v in clipped.items()} == {k: v.dtype for k, v in base_state.items()}
    moved = torch.sqrt(sum(((clipped[k].double() - base_state[k].double()) ** 2).sum() for k in base_state))
    assert 0.4 < moved <= 0.5 + 1e-6  # the counters leave as they came (task.scalars_from)

    plain = Message(RecordDict({"arrays": sent, "config": ConfigRecord({"server-round": 1})}), dst_node_id=101,
                    message_type=MessageType.TRAIN)
    assert client_dp(plain, context, lambda m, c: Message(trained, reply_to=m)).content is trained  # no DP asked


def test_fedprox_proximal_term_holds_local_training_near_the_global_model():
    """The same epoch with a large mu ends closer to where it started than without one."""
    from torch.utils.data import DataLoader, TensorDataset

    def distance_after(mu: float) -> float:
        torch.manual_seed(0)
        model = build_student(num_classes=10)
        start = [p.detach().clone() for p in model.parameters()]
        data = DataLoader(TensorDataset(torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))), batch_size=8)
        train_epoch(model, data, make_optimizer(model, lr=0.05), torch.device("cpu"), progress=False,
                    proximal=Proximal.at(model, mu) if mu else None)
        return float(sum((p.detach() - s).pow(2).sum() for p, s in zip(model.parameters(), start)).sqrt())

    assert distance_after(10.0) < 0.8 * distance_after(0.0)


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"strategy": "fedsgd"}, "unknown strategy"),
        ({"strategy": "krum", "byzantine": 1, "num_clients": 4}, "krum with --byzantine 1 needs at least 5"),
        ({"strategy": "bulyan", "byzantine": 1, "num_clients": 6}, "bulyan with --byzantine 1 needs at least 7"),
        ({"strategy": "krum", "num_clients": 2}, "needs at least 3"),
        ({"dp": "server-fixed", "dp_clipping_norm": 0.0}, "--dp-clipping-norm must be positive"),
        ({"dp": "local"}, "unknown --dp mode"),
        ({"proximal_mu": 0.01}, "--proximal-mu is a setting of fedprox"),
        ({"strategy": "fedadam", "server_momentum": 0.9}, "--server-momentum is a setting of fedavgm"),
        ({"strategy": "fedtrimmedavg", "trim_beta": 0.5}, "--trim-beta must be in"),
    ],
)
def test_bad_strategy_settings_are_one_line_config_errors(changes, words):
    with pytest.raises(ConfigError, match=words) as info:
        validate(RunConfig(**changes))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("main", [runner_main, server_main])
def test_a_bad_combination_exits_2_from_the_runner_and_the_server_script_before_any_work(main, capsys):
    assert main(["--strategy", "bulyan", "--byzantine", "1", "--num-clients", "5"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "bulyan" in errors[0]


def test_a_flwr_run_of_several_arms_checks_every_teacher_before_the_first_arm_trains(tmp_path, caplog):
    """A plain ``flwr run`` starts the ServerApp without the runner's checks: the plain arm
    needs no teacher, but the MergeNet arm after it does, so nothing may train before that fails."""
    cfg = RunConfig(dataset="fashion-mnist", train_limit=48, test_limit=32, fusion_arms="plain mergenet",
                    teacher_checkpoint=str(tmp_path / "missing.pt"), output_dir=str(tmp_path / "out"))
    context = Context(run_id=1, node_id=0, state=RecordDict(), run_config=cfg.to_run_config(), node_config={})
    with pytest.raises(SystemExit) as stopped:
        server_app.main(None, context)  # fails before it would ask the grid for anything
    assert stopped.value.code == 2
    assert "missing.pt not found" in caplog.text
    assert not (tmp_path / "out" / "plain").exists()


# --- order ------------------------------------------------------------------------------------


def test_the_aggregate_and_the_pooled_statistics_do_not_depend_on_the_order_replies_arrive_in(base_state):
    """Float sums depend on their order; a seeded run gives the same numbers whichever client
    answers first."""
    names = [k for k in base_state if k.endswith(("running_mean", "running_var"))]
    clients = ((1, 10), (2, 30), (3, 20))  # seed, examples

    def arriving(order: tuple[int, ...]) -> tuple[list[Message], list[Message]]:
        states = [client_state(base_state, s) for s, _ in clients]
        updates = [train_reply(state, n, node_id=100 + s, loss=float(s)) for state, (s, n) in zip(states, clients)]
        stats = [evaluate_reply({k: state[k].abs() for k in names}, n, 100 + s)
                 for state, (s, n) in zip(states, clients)]
        return [updates[i] for i in order], [stats[i] for i in order]

    results = []
    for order in ((0, 1, 2), (2, 1, 0), (1, 2, 0)):
        updates, stats = arriving(order)
        strategy = FedMergeNet(spec=spec_of(base_state), recalibrate_bn=True)
        arrays, _ = strategy.aggregate_train(1, updates)
        assert strategy.recalibrate(1, stats, arrays) == 3
        results.append(as_numpy(arrays))
    assert differing(results[0], results[1]) == differing(results[0], results[2]) == []
    # Flower's FedAvg alone sums in arrival order, and the last bits show it.
    assert differing(fedavg(arriving((0, 1, 2))[0]), fedavg(arriving((2, 1, 0))[0])) != []
