"""Training paths pinned by exact numbers: the learning rate of every step through warm-up, decay and FAR's
reconfigure, priming lengths, learner counts and ties, the worker cache after a failed client, and the bytes
autograd saves in a tiny BERT counted by hand."""
import pytest
import torch
from conftest import ListLoader, tiny_batch, tiny_model

from fedfar.devices.memory import saved_tensor_bytes
from fedfar.federation import exchange
from fedfar.federation.client import WorkerCache, local_update, prime_scores, priming_steps
from fedfar.federation.config import RunConfig
from fedfar.methods import FAR
from fedfar.methods.far import ffn_sizes, is_reconfigured, num_learners, random_learners, select_learners
from fedfar.models import load_model
from fedfar.train import TrainConfig, train
from torch.optim.optimizer import register_optimizer_step_pre_hook


class StepRecorder:
    """Every optimizer step of any optimizer (FAR rebuilds its optimizer at reconfigure): the learning rate of each
    param group and how many elements the optimizer trains, read when the step really runs."""

    def __init__(self):
        self.lrs, self.sizes = [], []

    def __enter__(self):
        def hook(opt, args, kwargs):
            self.lrs.append([g["lr"] for g in opt.param_groups])
            self.sizes.append(sum(p.numel() for g in opt.param_groups for p in g["params"]))

        self.handle = register_optimizer_step_pre_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# ------------------------------------------------------------------------------------------ learning rate
# 10 steps of one batch each. Expected factors written out by hand from "linear warm-up over `warmup` steps
# ((step + 1) / warmup), then linear decay to zero ((total - step) / (total - warmup))"; warmup and priming are
# round(share * total), at least one priming step. The shares are chosen so int() would give other counts.
LR_CASES = {
    # reconfigure during the decay: warmup = round(2.6) = 3 (int: 2), priming = round(4.6) = 5 (int: 4)
    "reconfigure-in-decay": (0.26, 0.46, 3, 5, [1 / 3, 2 / 3, 3 / 3, 7 / 7, 6 / 7, 5 / 7, 4 / 7, 3 / 7, 2 / 7, 1 / 7]),
    # reconfigure during the warm-up: warmup = round(4.6) = 5, priming = round(2.6) = 3
    "reconfigure-in-warmup": (0.46, 0.26, 5, 3, [1 / 5, 2 / 5, 3 / 5, 4 / 5, 5 / 5, 5 / 5, 4 / 5, 3 / 5, 2 / 5, 1 / 5]),
    # no warm-up, and round(0.1) = 0 priming steps clamped to one
    "no-warmup-one-priming-step": (0.0, 0.01, 0, 1, [10 / 10, 9 / 10, 8 / 10, 7 / 10, 6 / 10, 5 / 10, 4 / 10, 3 / 10,
                                                     2 / 10, 1 / 10]),
}


@pytest.mark.parametrize("case", sorted(LR_CASES))
def test_learning_rate_of_every_step_runs_on_through_reconfigure(case):
    """The schedule goes on where it was when FAR reconfigures: restarting it (a warm-up again, or a decay over
    the remaining steps) once left CoLA predicting one class."""
    warmup_share, priming_share, warmup, priming, factors = LR_CASES[case]
    lr = 1e-3
    model = tiny_model()
    cfg = TrainConfig(lr=lr, warmup_share=warmup_share, priming_share=priming_share)
    with StepRecorder() as rec:
        out = train(model, ListLoader(tiny_batch(2, 5, seed=s) for s in range(10)), FAR(retention=0.25), 1, cfg)
    assert out["steps"] == 10 and out["priming_steps"] == priming
    assert is_reconfigured(model)
    assert all(len(set(group_lrs)) == 1 for group_lrs in rec.lrs)  # every param group at the same rate
    assert [group_lrs[0] for group_lrs in rec.lrs] == pytest.approx([lr * f for f in factors], rel=1e-12, abs=0)
    seen = [group_lrs[0] for group_lrs in rec.lrs]
    assert all(a < b for a, b in zip(seen[:warmup], seen[1:warmup]))  # warm-up rises
    assert all(a > b for a, b in zip(seen[warmup:], seen[warmup + 1:]))  # decay falls to lr / (total - warmup)
    # The optimizer really was rebuilt at step `priming` over fewer elements (learners only): the rates above span
    # a reconfigure.
    assert len(set(rec.sizes[:priming])) == 1 and len(set(rec.sizes[priming:])) == 1
    assert rec.sizes[priming] < rec.sizes[0]


# ------------------------------------------------------------------------------------------ priming length
@pytest.mark.parametrize("share, steps_per_round, rounds, expected", [
    (0.1, 10, 5, 5),    # the whole run's local steps (50), not one round's (10 -> 1)
    (0.1, 17, 1, 2),    # round(1.7) = 2; int() gives 1
    (0.05, 26, 1, 1),   # round(1.3) = 1; ceil() gives 2
    (0.25, 10, 1, 2),   # round(2.5) = 2: Python rounds halves to even
    (0.01, 10, 3, 1),   # round(0.3) = 0, clamped to at least one step
    (1.0, 7, 2, 14),    # the whole run primes
])
def test_priming_steps_are_a_rounded_share_of_the_whole_run(share, steps_per_round, rounds, expected):
    assert priming_steps(RunConfig(priming_share=share, num_rounds=rounds), steps_per_round) == expected


# prime_scores passes steps / len(loader) epochs; 21 / 19 * 19 = 21.000000000000004 once ran 22 steps
def test_prime_scores_trains_exactly_the_priming_steps():
    model = tiny_model(num_hidden_layers=1)
    loader = ListLoader(tiny_batch(1, 4, seed=s) for s in range(19))
    with StepRecorder() as rec:
        prime_scores(model, loader, 21, RunConfig(method="far10"), seed=0)
    assert len(rec.lrs) == 21


# ------------------------------------------------------------------------------------------ learner counts and ties
@pytest.mark.parametrize("d_ff, retention, expected", [
    (64, 0.1, 6),       # 6.4
    (68, 0.1, 7),       # 6.8: int() gives 6
    (1536, 0.1, 154),   # MiniLM's FFN at far10: 153.6, int() gives 153
    (30, 0.25, 8),      # 7.5 -> 8 (even): int() gives 7
    (26, 0.25, 6),      # 6.5 -> 6: Python rounds halves to even
    (32, 0.01, 1),      # 0.32 rounds to 0: at least one learner
    (64, 1.0, 64),      # every node
    (10, 1.5, 10),      # never more than the block has
])
def test_num_learners_rounds_and_clamps(d_ff, retention, expected):
    assert num_learners(d_ff, retention) == expected


def test_far_keeps_the_rounded_number_of_learners_in_a_real_model():
    # intermediate_size 68: round(6.8) = 7 learners per block where int() would keep 6.
    model = tiny_model(intermediate_size=68)
    with StepRecorder():
        out = train(model, ListLoader([tiny_batch(2, 5)] * 2), FAR(retention=0.1), 1,
                    TrainConfig(lr=1e-3, priming_share=0.5))
    assert [len(x) for x in out["learners"]] == [7, 7]
    assert [len(x) for x in random_learners(ffn_sizes(model), 0.1, seed=0)] == [7, 7]


def test_tied_scores_go_to_the_lower_index():
    """Ties are common (nodes that did not move at all score 0): the documented rule is that the lower index
    wins, so every machine picks the same learners. topk or an unstable sort pick other nodes here."""
    flat = torch.zeros(64)
    assert select_learners([flat], 0.1)[0].tolist() == [0, 1, 2, 3, 4, 5]
    one_high = torch.full((64,), 0.5)
    one_high[40] = 2.0
    assert select_learners([one_high], 0.1)[0].tolist() == [0, 1, 2, 3, 4, 40]
    mixed = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0, 0.0, 3.0, 3.0])
    assert select_learners([mixed], 3 / 8)[0].tolist() == [1, 2, 4]
    assert select_learners([mixed], 6 / 8)[0].tolist() == [1, 2, 3, 4, 6, 7]


# ------------------------------------------------------------------------------------------ worker cache
class FailsAfterOneBatch(list):
    """A loader whose second batch raises: a client that dies mid-round with its model reconfigured and trained."""
    dataset = range(0)

    def __iter__(self):
        yield self[0]
        raise RuntimeError("client failed mid-round")


def test_worker_cache_hands_the_next_client_a_pristine_model_after_a_failure(tmp_path):
    tiny_model(dropout=True).save_pretrained(tmp_path)
    cfg = RunConfig(model=str(tmp_path), task="cola", method="far10", lr=1e-2)
    cache = WorkerCache()
    model = cache.model(cfg)
    plan = cfg.spec.exchange_plan(model)
    rows = random_learners(ffn_sizes(model), 0.1, seed=0)
    # The server's global model has moved away from the checkpoint: writing its part changes the cached model.
    gen = torch.Generator().manual_seed(0)
    global_state = {k: v + 0.01 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v.clone()
                    for k, v in model.state_dict().items()}
    part = exchange.select(global_state, plan, rows)
    with pytest.raises(RuntimeError, match="mid-round"):
        local_update(model, part, plan, rows, FailsAfterOneBatch([tiny_batch(), tiny_batch(seed=1)]), cfg, seed=0)
    assert is_reconfigured(model)  # the failure left it split, frozen in part and trained one step

    again = cache.model(cfg)
    fresh = load_model(str(tmp_path), 2, seed=0)
    assert again is model  # reused, not reloaded
    assert repr(again) == repr(fresh)  # stock layout: Linear, activation and Dropout(p=0.1) back in place
    got, want = again.state_dict(), fresh.state_dict()
    assert list(got) == list(want)
    assert all(torch.equal(got[k], want[k]) for k in want), [k for k in want if not torch.equal(got[k], want[k])]
    assert all(p.requires_grad for p in again.parameters())


# ------------------------------------------------------------------------------------------ saved tensors by hand
def hand_count_saved_bytes(L, B, T, h, heads, f, labels):
    """Bytes autograd saves in one training forward of a stock BERT for sequence classification (dropout 0,
    SDPA attention on CPU, torch 2.x, float32 = 4 bytes, int64 = 8), each storage once, parameters never.

    A view counts as the storage it keeps alive, not as its own shape: that is where the two terms marked (*)
    differ from a view-size count. A saved slice of a buffer counts nothing: buffers are in weights_bytes.
    """
    N = B * T  # tokens
    act = N * h * 4  # one (B, T, h) float32 activation
    embeddings = (
        N * 8          # word embedding backward: the input ids
        + T * 8        # (*) token-type embedding: ids gathered from the zeros buffer as (1, T), expanded to (B, T)
                       # position embedding: ids are a slice of the position_ids buffer, in weights_bytes
        + act          # LayerNorm input (the sum of the three embeddings)
        + 2 * N * 4    # LayerNorm mean and rstd
    )
    layer = (
        act                    # Q, K, V linears: their shared input (the previous LayerNorm's output)
        + 3 * act              # SDPA: q, k, v (head-split views of the three linears' outputs)
        + act                  # SDPA output (the attention output linear's input is a view of it)
        + B * heads * T * 4    # SDPA logsumexp
        + act + 2 * N * 4      # attention LayerNorm: input, mean, rstd
        + act                  # FFN first linear: its input (the attention LayerNorm's output)
        + N * f * 4            # GELU: its input (the first linear's output)
        + N * f * 4            # FFN second linear: its input (the GELU output)
        + act + 2 * N * 4      # output LayerNorm: input, mean, rstd
    )
    head = (
        act                # (*) pooler linear: its input is the [CLS] slice (B, h) of the last LayerNorm's output
        + B * h * 4        # tanh output (also the classifier's input: dropout 0 passes it through)
        + B * labels * 4   # log-softmax output (saved by log_softmax and by nll_loss: one storage)
        + B * 8            # nll_loss: the labels
        + 4                # nll_loss: total weight, a float32 scalar
    )
    return embeddings + L * layer + head


@pytest.mark.parametrize("batch_size, seq_len", [(4, 9), (3, 5)])
def test_saved_tensor_bytes_of_a_tiny_bert_counted_by_hand(batch_size, seq_len):
    model = tiny_model("bert")
    assert model.config._attn_implementation == "sdpa"  # the hand count assumes SDPA's saved tensors
    expected = hand_count_saved_bytes(L=2, B=batch_size, T=seq_len, h=32, heads=2, f=64,
                                      labels=2)
    assert saved_tensor_bytes(model, tiny_batch(batch_size, seq_len)) == expected
    if (batch_size, seq_len) == (4, 9):
        # Issue 13 saw 126,860, which also counted the 4,096-byte position_ids buffer that weights_bytes holds.
        assert expected == 126_860 - 512 * 8
