"""The simulator's predictions against figures worked out by hand on tiny traces: step times,
first tokens and finishes, borrowing's remote calls, creditors' time, defragmentation's cost,
and the roofline cost model's steps."""

from __future__ import annotations

import dataclasses

import pytest

from infinite_llm.sim.costs import RooflineCosts, ShardLoad, StepWork
from infinite_llm.sim.simulator import simulate
from infinite_llm.sim.specs import DeviceSpec, InstanceSpec, ModelSpec, NetworkSpec
from infinite_llm.sim.trace import TraceRequest

from .helpers import (
    CreditorCosts,
    RecordingCosts,
    linear_costs,
    requests,
    small_config,
)


def approx(x):
    """Equal up to float rounding: hand-worked seconds are sums of a few round numbers."""
    return pytest.approx(x, rel=1e-9, abs=1e-12)


# -- predictions against figures worked out by hand -----------------------------------------
# Block size 4 and a 16-token budget (``small_config``): a 20-token prompt is prefilled as a
# chunk of 16 then one of 4. Costs are ``LinearCosts`` with round coefficients, so each step's
# seconds can be added up on paper. A step that ends samples a token for every request whose
# chunk reached its last known token; first token and finish are stamped when that step ends.

STEP, TOKEN, REMOTE = 0.010, 0.001, 0.0005  # per step, per new token, per remote MA call


@pytest.mark.parametrize(("execution", "cluster_step_s"), [("parallel", 0.0), ("serial", 0.002)])
def test_one_request_timeline_is_the_hand_computed_one(execution, cluster_step_s):
    """One request (prompt 20, output 5) arriving at t = 0.1 s on one instance::

        step  computes                      seconds
        1     prompt 0-15 (chunk of 16)     0.010 + 16 x 0.001 = 0.026
        2     prompt 16-19, samples out 1   0.010 +  4 x 0.001 = 0.014
        3-6   one token each, samples 2-5   0.010 +  1 x 0.001 = 0.011  (x 4)

    parallel: first token 0.1 + 0.026 + 0.014 = 0.140, finish 0.140 + 4 x 0.011 = 0.184.
    serial adds ``cluster_step_s`` c = 0.002 after every cluster step (parallel ignores it):
    first token 0.140 + 2c = 0.144, finish 0.184 + 6c = 0.196.
    TTFT = first - 0.1; TPOT = (finish - first) / 4 = 0.011 + c. The makespan runs from the
    trace's origin (t = 0) to the last finish; throughput = 25 tokens / makespan."""
    c = cluster_step_s
    costs = RecordingCosts(linear_costs(cluster_step_s=c, step=STEP, new_tokens=TOKEN))
    reqs = [TraceRequest(0, 0.1, 20, 5, "test")]
    result = simulate(small_config(num_instances=1), costs, reqs, execution=execution)

    works = [w for w, _ in costs.steps]
    assert [w.num_new_tokens for w in works] == [16, 4, 1, 1, 1, 1]
    assert [w.num_samples for w in works] == [0, 1, 1, 1, 1, 1]
    assert [w.ctx_tokens for w in works] == [0, 16, 20, 21, 22, 23]  # cached before the step
    assert costs.seconds == [approx(s) for s in (0.026, 0.014, 0.011, 0.011, 0.011, 0.011)]

    (rec,) = result.records
    first, finish = 0.140 + 2 * c, 0.184 + 6 * c
    assert rec.first_token_s == approx(first)
    assert rec.finish_s == approx(finish)
    assert rec.ttft_s == approx(first - 0.1)
    assert rec.tpot_s == approx(0.011 + c)
    s = result.summary()
    assert s["makespan_s"] == approx(finish)
    assert s["tokens_per_s"] == approx(25 / finish)
    assert s["output_tokens_per_s"] == approx(5 / finish)
    assert s["requests_per_s"] == approx(1 / finish)
    assert s["ttft_p50_s"] == approx(first - 0.1) and s["tpot_p99_s"] == approx(0.011 + c)
    # busy time is the instance steps only: 0.026 + 0.014 + 4 x 0.011 = 0.084
    assert s["num_steps"] == 6 and s["busy_s"] == approx(0.084)
    # 16 + 4 + 4 computed = 25 - 1 needed (the last sampled token is never computed)
    assert s["computed_tokens"] == 24 and s["recomputed_fraction"] == 0.0
    assert s["kv_locality"] == 1.0 and s["remote_ma_calls_per_step"] == 0.0


@pytest.mark.parametrize("execution", ["parallel", "serial"])
def test_a_request_arriving_mid_step_joins_the_next_batch(execution):
    """One instance; A (prompt 4, output 3) at t = 0, B (prompt 4, output 2) at t = 0.005::

        [0, 0.014]      A's prompt (4 tokens): 0.010 + 0.004          A: token 1
        [0.014, 0.029]  A's decode + B's prompt (5 tokens): 0.015     A: token 2, B: token 1
        [0.029, 0.041]  both decode (2 tokens): 0.012                 A: token 3, B: token 2

    B waits for the step under way (TTFT 0.029 - 0.005 = 0.024); both finish at 0.041.
    A's TPOT = (0.041 - 0.014) / 2 = 0.0135, B's 0.012. Same in both executions: one instance,
    no cluster-step cost."""
    costs = RecordingCosts(linear_costs(step=STEP, new_tokens=TOKEN))
    reqs = requests((4, 3), (4, 2), gap=0.005)
    result = simulate(small_config(num_instances=1), costs, reqs, execution=execution)
    assert [w.num_seqs for w, _ in costs.steps] == [1, 2, 2]
    assert costs.seconds == [approx(0.014), approx(0.015), approx(0.012)]
    a, b = result.records
    assert (a.first_token_s, a.finish_s) == (approx(0.014), approx(0.041))
    assert (b.first_token_s, b.finish_s) == (approx(0.029), approx(0.041))
    assert b.ttft_s == approx(0.024)
    assert (a.tpot_s, b.tpot_s) == (approx(0.0135), approx(0.012))
    assert result.summary()["tokens_per_s"] == approx(13 / 0.041)


def test_serial_instances_share_one_clock_parallel_ones_do_not():
    """A (prompt 8, output 3) and B (prompt 4, output 2), both at t = 0, on two instances
    (``max_num_seqs=1``: even ``pack`` routing must put B on the second one). Steps:
    A 0.018 (prompt), 0.011, 0.011; B 0.014 (prompt), 0.011. ``cluster_step_s`` c = 0.001.

    parallel, each on its own clock: A first 0.018, finish 0.018 + 2 x 0.011 = 0.040;
    B first 0.014, finish 0.025 (c is not paid).
    serial, one device, each cluster step = the instances' steps in turn + c::

        cluster step 1: 0.018 + 0.014 + c -> 0.033   A: token 1, B: token 1
        cluster step 2: 0.011 + 0.011 + c -> 0.056   A: token 2, B: token 2 (done)
        cluster step 3: 0.011         + c -> 0.068   A: token 3 (done)
    """
    config = small_config(num_instances=2, borrowing=False, max_num_seqs=1)
    costs = linear_costs(cluster_step_s=0.001, step=STEP, new_tokens=TOKEN)
    reqs = requests((8, 3), (4, 2), gap=0.0)
    par = simulate(config, costs, reqs, execution="parallel")
    ser = simulate(config, costs, reqs, execution="serial")
    for result in (par, ser):
        assert [r.home for r in result.records] == [0, 1]
        assert result.summary()["num_steps"] == 5
        assert result.summary()["busy_s"] == approx(0.018 + 0.014 + 3 * 0.011)
    a, b = par.records
    assert (a.first_token_s, a.finish_s) == (approx(0.018), approx(0.040))
    assert (b.first_token_s, b.finish_s) == (approx(0.014), approx(0.025))
    assert par.summary()["makespan_s"] == approx(0.040)
    a, b = ser.records
    assert (a.first_token_s, a.finish_s) == (approx(0.033), approx(0.068))
    assert (b.first_token_s, b.finish_s) == (approx(0.033), approx(0.056))
    assert ser.extra["num_cluster_steps"] == 3
    assert ser.summary()["tokens_per_s"] == approx((11 + 6) / 0.068)


def test_a_borrowing_request_pays_a_remote_call_per_decode_step():
    """Pools of 4 rBlocks (16 tokens), two instances; one request (prompt 20, output 3) needs
    6 rBlocks: 4 at home, then 2 borrowed from instance 1 (tokens 16-19 and 20-23)::

        step  new  cached: home / on 1   remote calls   seconds
        1     16   0  / 0                0              0.010 + 0.016          = 0.026
        2      4   16 / 0 (writes 4)     0              0.010 + 0.004          = 0.014
        3      1   16 / 4                1              0.010 + 0.001 + 0.0005 = 0.0115
        4      1   16 / 5                1              0.010 + 0.001 + 0.0005 = 0.0115

    First token 0.040, finish 0.063: 2 x 0.5 ms later than on a pool that holds it (0.062).
    KV locality = home tokens read / all read = (16 + 16 + 16) / (16 + 20 + 21) = 48 / 57."""
    costs = RecordingCosts(linear_costs(step=STEP, new_tokens=TOKEN, remote_calls=REMOTE))
    result = simulate(small_config(num_instances=2, num_blocks=4), costs, requests((20, 3)))
    shards = [
        [(s.instance_id, s.ctx_tokens, s.num_writes) for s in w.shards] for w, _ in costs.steps
    ]
    assert shards == [
        [(0, 0, 16)],
        [(0, 16, 0), (1, 0, 4)],
        [(0, 16, 0), (1, 4, 1)],
        [(0, 16, 0), (1, 5, 1)],
    ]
    assert [w.num_remote_calls for w, _ in costs.steps] == [0, 0, 1, 1]
    assert costs.seconds == [approx(s) for s in (0.026, 0.014, 0.0115, 0.0115)]
    (rec,) = result.records
    assert (rec.first_token_s, rec.finish_s) == (approx(0.040), approx(0.063))
    s = result.summary()
    assert s["blocks_borrowed"] == 2 and s["all_free_after"]
    assert s["kv_locality"] == approx(48 / 57)
    assert s["remote_ma_calls_per_step"] == approx(2 / 4)

    local = simulate(small_config(num_instances=1), costs.base, requests((20, 3)))
    assert local.records[0].finish_s == approx(0.062)
    assert rec.finish_s - local.records[0].finish_s == approx(2 * REMOTE)


def test_creditor_ma_time_delays_the_creditor_in_parallel_and_adds_up_in_serial():
    """The borrowing request above (A: prompt 20, output 3, home 0, 2 rBlocks on instance 1),
    with 1 ms of MicroAttention on the creditor per cached token read there: A's steps 3 and 4
    read 4 and 5 tokens on instance 1, so they cost it 4 ms and 5 ms (``CreditorCosts``).

    parallel: A's own steps are unchanged (0.026, 0.014, 0.011, 0.011: first 0.040, finish
    0.062); the creditor's next step starts later. B (prompt 4, output 2) arrives at 0.042
    and goes to idle instance 1::

        0.040    A's step 3 starts: instance 1 (idle) busy with A's MA until 0.040 + 0.004 = 0.044
        0.044    B's prompt starts (arrived 0.042), 0.014 -> 0.058         B: token 1
        0.051    A's step 4 starts: 5 ms more on instance 1, after B's step: free at 0.063
        0.063    B's decode starts, 0.011 -> 0.074                         B: token 2

    serial (A alone): one device does the MA too, so a step costs its seconds plus its
    creditors': 0.026, 0.014, 0.011 + 0.004, 0.011 + 0.005; finish 0.071, busy 0.071."""
    config = small_config(num_instances=2, num_blocks=4)
    costs = CreditorCosts(linear_costs(step=STEP, new_tokens=TOKEN), ma_s_per_token=0.001)
    reqs = [TraceRequest(0, 0.0, 20, 3, "test"), TraceRequest(1, 0.042, 4, 2, "test")]
    a, b = simulate(config, costs, reqs, execution="parallel").records
    assert (a.home, b.home) == (0, 1)
    assert (a.first_token_s, a.finish_s) == (approx(0.040), approx(0.062))
    assert (b.first_token_s, b.finish_s) == (approx(0.058), approx(0.074))

    recorded = RecordingCosts(costs)
    serial = simulate(config, recorded, reqs[:1], execution="serial")
    assert [c.creditor_seconds for _, c in recorded.steps] == [
        {},
        {},
        {1: approx(0.004)},
        {1: approx(0.005)},
    ]
    (a,) = serial.records
    assert (a.first_token_s, a.finish_s) == (approx(0.040), approx(0.071))
    assert serial.summary()["busy_s"] == approx(0.071)


@pytest.mark.parametrize(("every", "finish"), [(2, 0.204), (3, 0.2045), (4, 0.205)])
def test_serial_defragmentation_brings_a_borrowed_rblock_home_at_its_cost(every, finish):
    """Serial, two pools of 4 rBlocks; A (prompt 8, output 2) and B (prompt 8, output 8) at
    t = 0, packed on instance 0 with 2 rBlocks each; defragmentation every ``every`` cluster
    steps, 0.1 s per migrated rBlock::

        cluster step 1: both prompts, 16 tokens: 0.026                   A, B: token 1
        cluster step 2: both decode (0.012): token 8 of each needs a third rBlock and the
                        pool is full: each borrows one from instance 1 -> 0.038  A done

    A's rBlocks are freed (2 at home). B then reads tokens 8.. on instance 1, one remote call
    a step (0.0115), until the defragmentation after cluster step ``every`` brings that rBlock
    home (0.1 s on the clock, after the step's tokens are stamped); then 0.011 a step. B's 8
    tokens need 6 decodes after step 2::

        every = 2: 0.038 + 0.1 + 6 x 0.011                = 0.204
        every = 3: 0.038 + 0.0115 + 0.1 + 5 x 0.011      = 0.2045
        every = 4: 0.038 + 2 x 0.0115 + 0.1 + 4 x 0.011  = 0.205
    """
    config = dataclasses.replace(
        small_config(num_instances=2, num_blocks=4), defrag_every_steps=every
    )
    costs = RecordingCosts(
        linear_costs(migrate_block_s=0.1, step=STEP, new_tokens=TOKEN, remote_calls=REMOTE)
    )
    result = simulate(config, costs, requests((8, 2), (8, 8), gap=0.0), execution="serial")
    a, b = result.records
    assert (a.home, b.home) == (0, 0)
    assert (a.first_token_s, a.finish_s) == (approx(0.026), approx(0.038))
    assert b.finish_s == approx(finish)
    remote = [w.num_remote_calls for w, _ in costs.steps]
    assert remote == [0, 0] + [1] * (every - 2) + [0] * (8 - every)
    s = result.summary()
    assert (s["blocks_borrowed"], s["migrated_blocks"], s["defrag_runs"]) == (2, 1, 1)
    assert s["all_free_after"]


def tiny_roofline(tp_size: int) -> RooflineCosts:
    """A model small enough to price by hand (derived figures in the test below)."""
    model = ModelSpec(
        "tiny",
        num_params=1128,
        num_layers=2,
        hidden_size=8,
        num_heads=2,
        num_kv_heads=1,
        head_dim=4,
        vocab_size=16,
    )
    device = DeviceSpec(
        "toy",
        memory_bytes=1e6,
        peak_flops=2e6,
        memory_bandwidth=2e5,
        flops_efficiency=0.5,
        bandwidth_efficiency=0.5,
        memory_utilization=0.5,
        activation_reserve_bytes=0.0,
        link_bandwidth=1.6e4,
        allreduce_latency_s=1e-3,
    )
    network = NetworkSpec(bandwidth=4e4, latency_s=5e-4)
    spec = InstanceSpec(
        model, device, tp_size, network, step_overhead_s=5e-3, per_seq_overhead_s=1e-3
    )
    return RooflineCosts(spec, block_size=4)


# One decode step of one request: 50 cached tokens at home, 100 on creditor 1 where the new
# token's K,V is also written, and 2 borrow messages while scheduling.
DECODE = StepWork(
    home_id=0,
    num_seqs=1,
    num_new_tokens=1,
    num_samples=1,
    self_pairs=1,
    shards=(ShardLoad(0, 1, 50, 50, 0), ShardLoad(1, 1, 100, 100, 1)),
    num_borrow_messages=2,
)


@pytest.mark.parametrize(
    ("tp_size", "seconds", "creditor_s"), [(1, 0.0648, 0.032), (2, 0.0468, 0.016)]
)
def test_roofline_decode_step_by_hand(tp_size, seconds, creditor_s):
    """The tiny model: 2 layers, hidden 8, 2 heads of 4 (1 KV head), vocab 16, 1128 params,
    2-byte weights and KV. By hand:

    * weights read per step: (1128 - 16 x 8 embedding) x 2 B = 2000 B
    * linear FLOPs: 2 x (1128 - 2 x 16 x 8) = 1744 per token; LM head 2 x 8 x 16 = 256 a sample
    * KV: 2 (K, V) x 2 layers x 1 head x 4 x 2 B = 32 B a token (16 a layer)
    * attention: 4 x 2 heads x 4 x 2 layers = 64 FLOPs a (query, cached token) pair
    * to a creditor a query row costs 2 x 4 x 2 = 16 B a layer, back 2 x (4 x 2 + 4) = 24 B

    A device: 2e6 x 0.5 = 1e6 FLOP/s, 2e5 x 0.5 = 1e5 B/s; an instance of tp devices, tp times.
    The network: 4e4 B/s, 0.5 ms one way (1 ms round trip).

    step = overhead + linear + TP all-reduces + max(local, remote)::

                 tp = 1                                tp = 2
    overhead     0.005 + 1 seq x 0.001 + 2 msgs x 0.001 = 0.008 (both)
    linear       max((1744 + 256)/1e6, 2000/1e5)       max((1744 + 256)/2e6, 2000/2e5)
                 = 0.020                               = 0.010
    all-reduce   none                                  2 a layer x 2 layers x (0.001 +
                                                       1 token x 8 x 2 B x 2 (2-1)/2
                                                       / 1.6e4) = 0.008
    local        1 x 64/1e6 + max(50 x 64/1e6,         1 x 64/2e6 + max(50 x 64/2e6,
                 50 x 32/1e5) = 0.016064               50 x 32/2e5) = 0.008032
    creditor MA  max(100 x 64/1e6, 100 x 32/1e5)       max(100 x 64/2e6, 100 x 32/2e5)
                 = 0.032                               = 0.016
    remote       2 layers x (0.001 + (1 row x (16 + 24) + 1 write x 16)/4e4) + MA
                 = 0.0048 + 0.032 = 0.0368             = 0.0048 + 0.016 = 0.0208
    step         0.008 + 0.020 + 0.0368 = 0.0648       0.008 + 0.010 + 0.008 + 0.0208 = 0.0468
    """
    cost = tiny_roofline(tp_size).step(DECODE)
    assert cost.seconds == approx(seconds)
    assert cost.creditor_seconds == {1: approx(creditor_s)}


def test_roofline_prefill_chunk_and_migration_by_hand():
    """tp = 2 (figures above). A first chunk of 16 prompt tokens, nothing cached, nothing
    sampled: linear max(16 x 1744/2e6 = 0.013952, 2000/2e5 = 0.010) = 0.013952 (compute-bound);
    all-reduces 2 x 2 x (0.001 + 16 x 8 x 2 B/1.6e4) = 0.068; causal pairs 16 x 17/2 = 136,
    136 x 64/2e6 = 0.004352; overhead 0.006: step 0.092304, no creditor.
    Migrating 3 rBlocks of 4 tokens: 0.0005 + 3 x 4 x 32 B/4e4 = 0.0101."""
    costs = tiny_roofline(2)
    prefill = StepWork(0, 1, 16, 0, 136, (ShardLoad(0, 0, 0, 0, 16),))
    cost = costs.step(prefill)
    assert cost.seconds == approx(0.092304)
    assert cost.creditor_seconds == {}
    assert costs.migrate_seconds(3) == approx(0.0101)
    assert costs.migrate_seconds(0) == 0.0
