"""The KV cache bookkeeping alone: block tables, reference counts, prefix caching, copy-on-write, swapping."""

from vdeploy_engine.core.kv_cache import KVCacheManager
from vdeploy_engine.core.sequence import Request, Sequence
from vdeploy_engine.sampling_params import SamplingParams


def make_seq(tokens: list[int]) -> Sequence:
    return Request("r", None, tokens, SamplingParams(), tokenizer=None).seqs[0]


def compute(kv: KVCacheManager, seq: Sequence, n: int) -> None:
    """What the scheduler and runner do for one step: allocate, then mark the tokens computed."""
    assert kv.allocate_slots(seq, n)
    seq.num_computed_tokens += n
    kv.cache_full_blocks(seq)


def test_allocation_grows_one_block_at_a_time_and_free_returns_everything():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    seq = make_seq(list(range(10)))
    compute(kv, seq, 10)
    assert len(seq.block_table) == 3  # 10 tokens in blocks of 4
    for token in range(6):  # decode: a new block only when the last one is full
        seq.token_ids.append(100 + token)
        compute(kv, seq, 1)
        assert len(seq.block_table) == -(-seq.num_computed_tokens // 4)
    assert kv.stats([seq]).waste_slots < 4
    kv.free(seq)
    assert kv.num_free_blocks == 8 and all(c == 0 for c in kv.ref_counts)


def test_allocation_fails_without_changing_anything():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    seq = make_seq(list(range(12)))
    assert not kv.allocate_slots(seq, 12)
    assert seq.block_table == [] and kv.num_free_blocks == 2


def test_prefix_cache_reuses_full_blocks_of_a_shared_prefix():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    first = make_seq(list(range(10)))
    compute(kv, first, 10)
    second = make_seq(list(range(8)) + [50, 51, 52])  # shares two full blocks
    hits = kv.computed_blocks(second)
    assert hits == first.block_table[:2]
    assert kv.allocate_slots(second, 3, hits)
    assert second.num_computed_tokens == 8 and second.block_table[:2] == first.block_table[:2]
    assert kv.ref_counts[first.block_table[0]] == 2
    assert (kv.prefix_queries, kv.prefix_hits) == (10 + 11, 8)


def test_prefix_cache_survives_free_and_leaves_one_token_to_compute():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    first = make_seq(list(range(8)))
    compute(kv, first, 8)
    blocks = list(first.block_table)
    kv.free(first)
    again = make_seq(list(range(8)))
    hits = kv.computed_blocks(again)
    assert hits == blocks[:1]  # the last token must still run through the model to give logits
    assert kv.allocate_slots(again, 4, hits)
    assert again.num_computed_tokens == 4


def test_prefix_cache_off_finds_nothing():
    kv = KVCacheManager(num_blocks=16, block_size=4, enable_prefix_caching=False)
    first = make_seq(list(range(10)))
    compute(kv, first, 10)
    assert kv.computed_blocks(make_seq(list(range(10)))) == []


def test_reused_free_block_loses_its_cached_prefix():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    first = make_seq(list(range(8)))
    compute(kv, first, 8)
    kv.free(first)
    other = make_seq([9] * 8)
    compute(kv, other, 8)  # needs both blocks: evicts the cached prefix
    assert kv.cached.keys() == set(other.block_hashes)
    assert kv.computed_blocks(make_seq(list(range(8)) + [1])) == []


def test_fork_shares_blocks_and_copies_the_partial_block_on_write():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    parent = make_seq(list(range(6)))
    compute(kv, parent, 6)
    child = parent.fork(1)
    kv.fork(parent, child)
    assert kv.ref_counts[parent.block_table[1]] == 2
    for seq in (parent, child):
        seq.token_ids.append(7)
        compute(kv, seq, 1)
    # The first writer copied the shared partial block; the last writer kept it.
    assert parent.block_table[0] == child.block_table[0]
    assert parent.block_table[1] != child.block_table[1]
    src, dst = kv.take_pending()[2][0]
    assert src == child.block_table[1] and dst == parent.block_table[1]
    assert kv.ref_counts[parent.block_table[0]] == 2 and kv.ref_counts[child.block_table[1]] == 1


def test_swap_out_and_in_moves_blocks_and_queues_copies():
    kv = KVCacheManager(num_blocks=4, block_size=4, num_cpu_blocks=4)
    seq = make_seq(list(range(8)))
    compute(kv, seq, 8)
    gpu_blocks = list(seq.block_table)
    assert kv.can_swap_out(seq)
    kv.swap_out(seq)
    assert kv.num_free_blocks == 4 and len(kv.free_cpu_blocks) == 2
    assert kv.can_swap_in(seq, 1)
    kv.swap_in(seq)
    swap_out, swap_in, _ = kv.take_pending()
    assert [g for g, _ in swap_out] == gpu_blocks
    assert [c for c, _ in swap_in] == [c for _, c in swap_out]
    assert len(kv.free_cpu_blocks) == 4 and kv.num_free_blocks == 2
