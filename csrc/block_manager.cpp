// Paged-KV block allocator with a prefix index (the rollout runtime's CPU-side hot path).
//
// A pool of `num_blocks` blocks of `block_size` token slots. Blocks are reference counted: the
// G samples of a group share their prompt's blocks (fork), and a shared, partially filled last
// block is copied before it is written (copy-on-write). Every *full* block gets a chained hash
// (hash of the previous block's hash and its tokens); the prefix index maps hashes to blocks,
// so a prompt whose leading blocks are already cached reuses them instead of recomputing them.
// A freed block keeps its hash until the block is handed out again, so recently freed prefixes
// (a preempted sequence, a finished group's prompt) are still found. The free queue hands out
// never-hashed blocks first, then the least recently freed.
//
// The Python model of this class is mapo_fast/kernels/block_manager_ref.py; tests compare the two on
// random operation sequences.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <deque>
#include <stdexcept>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

namespace py = pybind11;

namespace {

constexpr uint64_t kNoHash = 0;

uint64_t mix64(uint64_t x) {  // splitmix64 finaliser
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

}  // namespace

// Chained hash of one full block: depends on every token of the prefix up to its end.
uint64_t block_hash(uint64_t prev, const std::vector<int64_t>& tokens, size_t begin,
                    size_t end) {
  uint64_t h = mix64(prev ^ 0x5bd1e9955bd1e995ULL);
  for (size_t i = begin; i < end; ++i) h = mix64(h ^ static_cast<uint64_t>(tokens[i]));
  return h == kNoHash ? 1 : h;
}

class BlockManager {
 public:
  BlockManager(int64_t num_blocks, int64_t block_size)
      : block_size_(block_size), ref_(num_blocks, 0), hash_(num_blocks, kNoHash) {
    if (num_blocks <= 0) throw std::invalid_argument("num_blocks must be > 0");
    if (block_size <= 0) throw std::invalid_argument("block_size must be > 0");
    for (int64_t b = 0; b < num_blocks; ++b) free_.push_back(b);
  }

  int64_t block_size() const { return block_size_; }
  int64_t num_blocks() const { return static_cast<int64_t>(ref_.size()); }
  int64_t num_free() const { return static_cast<int64_t>(free_.size()); }
  int64_t ref_count(int64_t b) const { return ref_.at(check(b)); }
  int64_t blocks_for(int64_t tokens) const { return (tokens + block_size_ - 1) / block_size_; }
  bool can_allocate(int64_t blocks) const { return blocks <= num_free(); }

  // Block of a cached full-block hash, or -1.
  int64_t lookup(uint64_t h) const {
    auto it = index_.find(h);
    return it == index_.end() ? -1 : it->second;
  }

  // Chained hashes of the full blocks of `tokens`.
  std::vector<uint64_t> prompt_hashes(const std::vector<int64_t>& tokens) const {
    std::vector<uint64_t> hashes;
    uint64_t h = kNoHash;
    for (int64_t i = 0; i + block_size_ <= static_cast<int64_t>(tokens.size()); i += block_size_) {
      h = block_hash(h, tokens, i, i + block_size_);
      hashes.push_back(h);
    }
    return hashes;
  }

  // Capacity query: free blocks that add(tokens) / allocate_prompt(tokens) would take (leading
  // blocks found in the prefix index are shared; a cached block that is free still counts, as
  // it leaves the free queue). Those calls succeed exactly when this is <= num_free.
  int64_t add_cost(const std::vector<int64_t>& tokens) const {
    int64_t hits = 0, revived = 0;
    for (uint64_t hh : prompt_hashes(tokens)) {
      const int64_t b = lookup(hh);
      if (b < 0) break;
      ++hits;
      if (ref_[b] == 0) ++revived;
    }
    return blocks_for(static_cast<int64_t>(tokens.size())) - hits + revived;
  }

  // Capacity query: free blocks that appending counts[i] tokens to sequence ids[i] would take
  // (an id may repeat: its counts add up): the new blocks past each table's end, plus one
  // copy-on-write per sequence whose partly filled last block is shared. An upper bound,
  // exact unless two of the sequences share that block (the second write needs no copy).
  // append_tokens succeeds whenever this is <= num_free.
  int64_t append_cost(const std::vector<int64_t>& ids, const std::vector<int64_t>& counts) const {
    if (ids.size() != counts.size())
      throw std::invalid_argument("append_cost: " + std::to_string(ids.size()) + " ids, " +
                                  std::to_string(counts.size()) + " counts");
    std::unordered_map<int64_t, int64_t> total;
    std::vector<int64_t> order;
    for (size_t i = 0; i < ids.size(); ++i) {
      if (counts[i] < 0)
        throw std::invalid_argument("append_cost: negative count " + std::to_string(counts[i]));
      seq(ids[i]);  // unknown ids raise
      if (total.emplace(ids[i], 0).second) order.push_back(ids[i]);
      total[ids[i]] += counts[i];
    }
    int64_t need = 0;
    for (int64_t id : order) {
      const int64_t c = total[id];
      if (c == 0) continue;
      const Seq& s = seq(id);
      const int64_t n = static_cast<int64_t>(s.tokens.size());
      const int64_t len = static_cast<int64_t>(s.table.size());
      const int64_t k = n / block_size_;
      need += std::max<int64_t>(0, blocks_for(n + c) - len);
      if (k < len && ref_[s.table[k]] > 1) ++need;
    }
    return need;
  }

  // Blocks and cached-token count for a prompt: leading full blocks found in the prefix index
  // are shared (their tokens need no prefill); the rest are fresh. Full fresh blocks are
  // registered in the index (their KV is about to be written by the prefill).
  std::pair<std::vector<int64_t>, int64_t> allocate_prompt(const std::vector<int64_t>& tokens) {
    const int64_t n = static_cast<int64_t>(tokens.size());
    const int64_t need = blocks_for(n);
    std::vector<int64_t> table;
    table.reserve(need);
    int64_t cached = 0;
    bool hitting = true;
    // count the cache hits first so that running out of blocks changes nothing
    const std::vector<uint64_t> hashes = prompt_hashes(tokens);
    const int64_t cost = add_cost(tokens);
    if (cost > num_free())
      throw std::runtime_error("out of KV blocks: need " + std::to_string(cost) + ", free " +
                               std::to_string(num_free()));
    for (int64_t k = 0; k < need; ++k) {
      int64_t b = -1;
      if (hitting && k < static_cast<int64_t>(hashes.size())) {
        b = lookup(hashes[k]);
        if (b >= 0) {
          if (ref_[b] == 0) take_free(b);
          ++ref_[b];
          cached += block_size_;
        } else {
          hitting = false;
        }
      }
      if (b < 0) {
        b = pop_free();
        if (k < static_cast<int64_t>(hashes.size())) register_hash(b, hashes[k]);
      }
      table.push_back(b);
    }
    return {table, cached};
  }

  // A new table sharing every block of `table` (a sample forked from its group's prompt).
  std::vector<int64_t> fork(const std::vector<int64_t>& table) {
    for (int64_t b : table) ++ref_.at(check(b));
    return table;
  }

  // Makes room for token `pos` (0-based) of a sequence whose blocks are `table`. Returns the
  // new table and (src, dst): the copy-on-write the caller must do on the KV cache before
  // writing, or (-1, -1). Blocks filled by decoding enter the index through register_full.
  std::tuple<std::vector<int64_t>, int64_t, int64_t> append(std::vector<int64_t> table,
                                                             int64_t pos) {
    int64_t src = -1, dst = -1;
    const int64_t k = pos / block_size_;
    if (k > static_cast<int64_t>(table.size()))
      throw std::invalid_argument("append: position " + std::to_string(pos) +
                                  " skips a block of the table");
    if (k == static_cast<int64_t>(table.size())) {
      if (free_.empty()) throw std::runtime_error("out of KV blocks: need 1, free 0");
      table.push_back(pop_free());
    } else {
      int64_t b = check(table[k]);
      if (ref_[b] > 1) {  // shared: copy it before writing
        if (free_.empty()) throw std::runtime_error("out of KV blocks: need 1, free 0");
        int64_t nb = pop_free();
        --ref_[b];
        src = b;
        dst = nb;
        table[k] = nb;
      } else if (hash_[b] != kNoHash) {
        // writing into a block that the index names: the hash no longer describes it
        unregister(b);
      }
    }
    return {table, src, dst};
  }

  // Registers a full block of a running sequence (its KV is written) under its chained hash.
  void register_full(int64_t b, uint64_t h) {
    check(b);
    if (hash_[b] == kNoHash && index_.find(h) == index_.end()) register_hash(b, h);
  }

  void free_table(const std::vector<int64_t>& table) {
    for (int64_t b : table) release(b);
  }

  void release(int64_t b) {
    check(b);
    if (ref_[b] <= 0) throw std::runtime_error("double free of block " + std::to_string(b));
    if (--ref_[b] == 0) {
      if (hash_[b] == kNoHash)
        free_.push_front(b);  // nothing cached in it: hand it out first
      else
        free_.push_back(b);   // keep cached prefixes as long as possible
    }
  }

  // ---- sequences: the engine's per-step interface, one call per batch --------------------
  // A sequence owns a block table, its tokens and the chained hash of its last full block.

  // A new sequence for `tokens` (its prompt): returns (id, cached tokens that need no prefill).
  std::pair<int64_t, int64_t> add(const std::vector<int64_t>& tokens) {
    auto [table, cached] = allocate_prompt(tokens);
    Seq seq{std::move(table), tokens, kNoHash};
    for (int64_t i = 0; i + block_size_ <= static_cast<int64_t>(tokens.size()); i += block_size_)
      seq.hash = block_hash(seq.hash, tokens, i, i + block_size_);
    return {store(std::move(seq)), cached};
  }

  // A new sequence sharing every block of `id` (a sample of its group).
  int64_t fork_seq(int64_t id) {
    Seq copy = seq(id);
    fork(copy.table);
    return store(std::move(copy));
  }

  // Appends tokens[i] to sequence ids[i], for every i. Returns the KV slot of each new token
  // (block * block_size + offset) and the (src, dst) block copies to do before writing.
  // Blocks that fill up are registered in the prefix index. All or nothing: if the pool runs
  // out, nothing is changed and the error says how many blocks were needed.
  std::pair<std::vector<int64_t>, std::vector<std::pair<int64_t, int64_t>>> append_tokens(
      const std::vector<int64_t>& ids, const std::vector<int64_t>& tokens) {
    if (ids.size() != tokens.size())
      throw std::invalid_argument("append_tokens: " + std::to_string(ids.size()) + " ids, " +
                                  std::to_string(tokens.size()) + " tokens");
    const int64_t need = append_cost(ids, std::vector<int64_t>(ids.size(), 1));
    if (need > num_free())
      throw std::runtime_error("out of KV blocks: need " + std::to_string(need) + ", free " +
                               std::to_string(num_free()));
    std::vector<int64_t> slots;
    std::vector<std::pair<int64_t, int64_t>> copies;
    slots.reserve(ids.size());
    for (size_t i = 0; i < ids.size(); ++i) {
      Seq& s = seqs_.at(ids[i]);
      const int64_t pos = static_cast<int64_t>(s.tokens.size());
      auto [table, src, dst] = append(std::move(s.table), pos);
      s.table = std::move(table);
      if (src >= 0) copies.emplace_back(src, dst);
      s.tokens.push_back(tokens[i]);
      const int64_t n = pos + 1;
      if (n % block_size_ == 0) {
        s.hash = block_hash(s.hash, s.tokens, n - block_size_, n);
        register_full(s.table[n / block_size_ - 1], s.hash);
      }
      slots.push_back(s.table[pos / block_size_] * block_size_ + pos % block_size_);
    }
    return {slots, copies};
  }

  void free_seq(int64_t id) {
    free_table(seq(id).table);
    seqs_.erase(id);
  }

  std::vector<int64_t> block_table(int64_t id) const { return seq(id).table; }
  int64_t num_tokens(int64_t id) const { return static_cast<int64_t>(seq(id).tokens.size()); }
  int64_t num_seqs() const { return static_cast<int64_t>(seqs_.size()); }

 private:
  struct Seq {
    std::vector<int64_t> table;
    std::vector<int64_t> tokens;
    uint64_t hash;  // chained hash of the last full block
  };

  const Seq& seq(int64_t id) const {
    auto it = seqs_.find(id);
    if (it == seqs_.end()) throw std::out_of_range("sequence id " + std::to_string(id));
    return it->second;
  }

  int64_t store(Seq s) {
    seqs_.emplace(next_id_, std::move(s));
    return next_id_++;
  }

  std::unordered_map<int64_t, Seq> seqs_;
  int64_t next_id_ = 0;

  int64_t check(int64_t b) const {
    if (b < 0 || b >= num_blocks()) throw std::out_of_range("block id " + std::to_string(b));
    return b;
  }

  int64_t pop_free() {
    int64_t b = free_.front();
    free_.pop_front();
    if (hash_[b] != kNoHash) unregister(b);  // evict its cached prefix
    ref_[b] = 1;
    return b;
  }

  void take_free(int64_t b) {  // revive a freed, still cached block
    for (auto it = free_.begin(); it != free_.end(); ++it) {
      if (*it == b) {
        free_.erase(it);
        return;
      }
    }
    throw std::logic_error("block " + std::to_string(b) + " is not free");
  }

  void register_hash(int64_t b, uint64_t h) {
    auto it = index_.find(h);
    if (it != index_.end()) hash_[it->second] = kNoHash;  // newest block wins
    index_[h] = b;
    hash_[b] = h;
  }

  void unregister(int64_t b) {
    auto it = index_.find(hash_[b]);
    if (it != index_.end() && it->second == b) index_.erase(it);
    hash_[b] = kNoHash;
  }

  int64_t block_size_;
  std::vector<int64_t> ref_;
  std::vector<uint64_t> hash_;
  std::deque<int64_t> free_;
  std::unordered_map<uint64_t, int64_t> index_;
};

PYBIND11_MODULE(_block_manager, m) {
  m.doc() = "Paged-KV block allocator with a prefix index (C++).";
  m.def("block_hash", &block_hash, py::arg("prev"), py::arg("tokens"), py::arg("begin"),
        py::arg("end"));
  py::class_<BlockManager>(m, "BlockManager")
      .def(py::init<int64_t, int64_t>(), py::arg("num_blocks"), py::arg("block_size"))
      .def_property_readonly("block_size", &BlockManager::block_size)
      .def_property_readonly("num_blocks", &BlockManager::num_blocks)
      .def_property_readonly("num_free", &BlockManager::num_free)
      .def("ref_count", &BlockManager::ref_count)
      .def("blocks_for", &BlockManager::blocks_for)
      .def("can_allocate", &BlockManager::can_allocate)
      .def("lookup", &BlockManager::lookup)
      .def("add_cost", &BlockManager::add_cost, py::arg("tokens"))
      .def("append_cost", &BlockManager::append_cost, py::arg("ids"), py::arg("counts"))
      .def("allocate_prompt", &BlockManager::allocate_prompt)
      .def("fork", &BlockManager::fork)
      .def("append", &BlockManager::append)
      .def("register_full", &BlockManager::register_full)
      .def("free_table", &BlockManager::free_table)
      .def("release", &BlockManager::release)
      .def("add", &BlockManager::add)
      .def("fork_seq", &BlockManager::fork_seq)
      .def("append_tokens", &BlockManager::append_tokens)
      .def("free_seq", &BlockManager::free_seq)
      .def("block_table", &BlockManager::block_table)
      .def("num_tokens", &BlockManager::num_tokens)
      .def_property_readonly("num_seqs", &BlockManager::num_seqs);
}
