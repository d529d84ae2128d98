// LASER retrieval pool: a count trie of token n-gram continuations.
//
// No Python types here: pointer + length in, plain structs out. bindings.cpp is the
// only file that knows about pybind11.
//
// Invariants (checked by tests/test_pool.py):
//   * node 0 is the root; every other node has parent < its own index (nodes are
//     appended, and prune() renumbers breadth-first). Nodes store no parent: the child
//     lists and the edge map hold the structure;
//   * without pruning, a parent's count >= the sum of its children's counts (a window
//     increments every node on its path). draft() does not rely on it: a node enters the
//     frontier only after its parent was selected, so the result is always a tree;
//   * the edge map holds exactly one entry (parent, token) -> child per non-root node;
//   * size() <= max_nodes at all times (prune() runs before a window could overflow).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <new>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace laser {

// Allocator for the pool's big arrays (nodes, edge slots): blocks of 2 MiB and more are
// 2 MiB-aligned and marked for transparent huge pages, so random node visits in a
// million-node trie do not each miss the TLB. Small blocks come from malloc.
template <typename T>
struct HugePageAllocator {
  using value_type = T;
  HugePageAllocator() = default;
  template <typename U>
  HugePageAllocator(const HugePageAllocator<U>&) {}
  T* allocate(size_t n);
  void deallocate(T* p, size_t) { std::free(p); }
  template <typename U>
  bool operator==(const HugePageAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const HugePageAllocator<U>&) const { return false; }
};
void* huge_page_alloc(size_t bytes);  // malloc-compatible (free() releases it)
template <typename T>
T* HugePageAllocator<T>::allocate(size_t n) {
  void* p = huge_page_alloc(n * sizeof(T));
  if (!p) throw std::bad_alloc();
  return static_cast<T*>(p);
}

// Raised for truncated, corrupt or foreign pool files.
struct PoolFormatError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// Raised when a pool file cannot be opened, written or renamed.
struct PoolIOError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Open-addressing hash map (parent, token) -> child index. Linear probing, power-of-two
// capacity, load <= 1/2, key and value in one 16-byte slot (one cache miss per probe).
// No erase: prune() rebuilds it from scratch.
class EdgeMap {
 public:
  static uint64_t key(int32_t parent, int32_t token) {
    return (uint64_t(uint32_t(parent)) << 32) | uint32_t(token);
  }
  static uint64_t hash(uint64_t k) {  // splitmix64 finaliser
    k ^= k >> 30; k *= 0xbf58476d1ce4e5b9ULL; k ^= k >> 27; k *= 0x94d049bb133111ebULL;
    return k ^ (k >> 31);
  }
  void reserve(size_t n_edges);
  void prefetch(uint64_t h) const {
    if (!slots_.empty()) __builtin_prefetch(&slots_[h & mask_]);
  }
  int32_t find(uint64_t k, uint64_t h) const;
  int32_t find(int32_t parent, int32_t token) const { const uint64_t k = key(parent, token); return find(k, hash(k)); }
  void insert(uint64_t k, uint64_t h, int32_t child);  // key must be absent
  void insert(int32_t parent, int32_t token, int32_t child) { const uint64_t k = key(parent, token); insert(k, hash(k), child); }
  void clear();
  size_t memory_bytes() const { return slots_.capacity() * sizeof(Slot); }

 private:
  static constexpr uint64_t kEmpty = ~uint64_t(0);
  struct Slot {
    uint64_t key;
    int64_t child;
  };
  std::vector<Slot, HugePageAllocator<Slot>> slots_;
  size_t size_ = 0, mask_ = 0;
};

struct Node {
  int32_t token;          // token on the edge from parent; -1 for the root
  int32_t first_child;    // -1 if leaf; children form a singly linked list
  int32_t next_sibling;   // -1 at the end of the list
  int32_t n_children;
  mutable int32_t cache;  // index of this node's best-children list in the cache (-1: none;
                          // stale after a cache clear, detected through CachedKids::owner)
  int16_t depth;          // 0 for the root
  mutable uint8_t dirty;  // force a rebuild of this node's cached best children
  uint8_t pad_;
  double count;           // weighted number of windows through this node
};
static_assert(sizeof(Node) == 32, "Node is one half cache line");

// Flattened draft tree, nodes in depth-first pre-order (parent index < child index).
// Every array lives in one allocation (`buf`); the pointers point into it, so a moved
// tree keeps them valid and a tree is never copied.
struct DraftTree {
  int32_t n = 0;                  // number of nodes (<= budget)
  int32_t match_len = 0;          // length of the matched context suffix (0: no match)
  int32_t n_paths = 0;            // number of leaves
  int32_t path_width = 0;         // longest root-to-leaf path
  double root_count = 0.0;        // weighted count of the matched context (counts / root_count = chance)
  int32_t* tokens = nullptr;      // [n]
  int32_t* parents = nullptr;     // [n]   DFS index of the parent, -1 = child of the context
  int32_t* depth = nullptr;       // [n]   1 for children of the context
  float* counts = nullptr;        // [n]   pool count (weighted sum across pools); calibrated: the chance
  int32_t* bins = nullptr;        // [n]   AcceptanceModel bin of the node (-1: drafted without one)
  int32_t* rank = nullptr;        // [n]   selection order (best-first); rank < b is a subtree
  int32_t* paths = nullptr;       // [n_paths, path_width] DFS indices root->leaf, -1 padded
  uint8_t* mask = nullptr;        // [n, n] mask[i*n + j] = j is an ancestor of i or j == i (zeroed)
  std::unique_ptr<int32_t[]> buf;
  // Sets n, n_paths, path_width and the array pointers; paths start at -1, bins at -1, mask at 0.
  void allocate(int32_t n_nodes, int32_t leaves, int32_t width);
};

struct DraftParams {
  // Defaults agree with laser.DraftConfig (tests/test_pool.py checks the Python signatures).
  int32_t budget = 32;     // exact cap on the number of nodes
  int32_t max_depth = 10;  // cap on node depth
  int32_t min_match = 2;   // shortest context suffix accepted as a match
  int32_t max_match = 4;   // longest context suffix tried
  // Optional cost curve: cost[b] = time of verifying b tree nodes, b = 0..cost_len-1.
  // When given, the tree is cut to the prefix (in best-first order) of size b that
  // maximises (1 + expected accepted) / cost[b]; expected accepted = sum of each node's
  // count divided by its root count (the empirical chance that the text follows it).
  const double* cost = nullptr;
  int32_t cost_len = 0;
  // Optional acceptance model: nodes are scored by their calibrated chance (see AcceptanceModel),
  // sources[p] names pool p's source slot, and past the first min_nodes nodes (best-first) candidates
  // below min_chance never enter: a fixed floor, and above it only the likely nodes.
  const class AcceptanceModel* acceptance = nullptr;
  const int32_t* sources = nullptr;  // [n_pools] in [0, AcceptanceModel::kSources); null: all 0
  double min_chance = 0.0;
  int32_t min_nodes = 0;  // the best-first first min_nodes nodes enter whatever their chance
  // Each pool drafts from its match_levels longest matched suffixes (>= min_match), not only
  // the longest: shorter contexts add continuations the longest one never saw.
  int32_t match_levels = 1;
};

// Acceptance model of drafted nodes, learned from verified trees: q(bin) estimates the chance
// that a node is accepted given that its parent was (or that it is a child of the context), by
//   bin = (source slot of the pool it came from, the length of the context its parent stands
//          for in that pool (match length + depth - 1), the parent's count there, whether the
//          token continues the longest context any drafting pool holds at that node, the node's
//          share of that count).
// The third feature separates a token that the longest context also saw from one only shorter
// contexts propose (the longest context chose otherwise, or has not continued): for tokens of
// equal share, the second kind is accepted less often.
// A calibrated draft scores a node by the product of q along its path: the chance that the
// text follows the whole path, which is what the best-first growth and the cost cut use.
// q = (hits + prior * m) / (tries + prior), where m is the same estimate for the bin's source
// and share with the other features pooled (itself shrunk toward the bin's mid share), then
// fitted nondecreasing in the share within each (source, context, count, longest) row (isotonic
// regression, weights tries + prior), so that a node's children sorted by count are sorted by q. Thread-safe: observe() takes the write lock,
// draft() a shared one.
class AcceptanceModel {
 public:
  static constexpr int kSources = 4, kContexts = 10, kCounts = 8, kLongest = 2, kShares = 10;
  static constexpr int kBins = kSources * kContexts * kCounts * kLongest * kShares;
  explicit AcceptanceModel(double prior);
  // longest: the token continues the longest context at its parent (always so with one pool).
  static int32_t bin(int32_t source, int32_t context, double parent_count, double share, bool longest = true);
  // One verified tree: path[0:n_path] = DFS indices of its accepted nodes (a root path).
  void observe(const DraftTree& t, const int32_t* path, int32_t n_path);
  // Replace the counts (hits <= tries, both [kBins]); for resuming a saved model.
  void set_state(const double* hits, const double* tries);
  double prior() const { return prior_; }
  const std::vector<double>& hits() const { return hits_; }  // caller holds lock_shared()
  const std::vector<double>& tries() const { return tries_; }
  const std::vector<double>& q() const { return q_; }
  std::shared_mutex& mutex() const { return mu_; }

 private:
  void refresh(int32_t source);  // recompute q of one source slot from its counts
  double prior_;
  std::vector<double> hits_, tries_, q_;
  std::vector<uint8_t> acc_;  // observe(): [n] 1 on the accepted path (under the write lock)
  mutable std::shared_mutex mu_;
};

class Pool {
 public:
  // max_depth: longest window stored. vocab_size: ids must be < vocab_size (0: any
  // non-negative int32). max_nodes: hard cap on the node count (root included).
  Pool(int32_t max_depth, int64_t vocab_size, int64_t max_nodes, double decay);

  // Count every window tokens[i : i + d], d = 1..max_depth, with `weight`.
  void insert(const int32_t* tokens, int64_t n, double weight);
  // Streaming insert: `prefix` (any length; only the last max_depth-1 tokens matter) was
  // already inserted. Count only the windows that end inside `tokens`, so that
  // insert(a); extend(a, b) counts exactly what insert(a + b) counts.
  void extend(const int32_t* prefix, int64_t n_prefix, const int32_t* tokens, int64_t n, double weight);

  // Raises std::invalid_argument for ids < 0 or >= vocab_size.
  void check_tokens(const int32_t* tokens, int64_t n) const;

  int64_t size() const;  // number of nodes, root included
  int64_t memory_bytes() const;
  int32_t max_depth() const { return max_depth_; }
  int64_t vocab_size() const { return vocab_size_; }
  int64_t max_nodes() const { return max_nodes_; }
  int64_t prune_count() const { return prunes_; }
  // count of the node reached by `tokens` from the root, 0 if absent
  double count(const int32_t* tokens, int64_t n) const;

  void save(const std::string& path) const;
  static std::unique_ptr<Pool> load(const std::string& path);

  // Internals used by draft(); callers must hold lock_shared().
  const std::vector<Node, HugePageAllocator<Node>>& nodes() const { return nodes_; }
  int32_t child(int32_t parent, int32_t token) const { return edges_.find(parent, token); }
  // Deepest node matching a suffix of ctx with min_match <= length <= max_match, or -1.
  int32_t match(const int32_t* ctx, int64_t n, int32_t min_match, int32_t max_match, int32_t* len) const;
  std::shared_mutex& mutex() const { return mu_; }
  // Up to `room` children of `node`, best first by (count desc, token asc). Nodes with a
  // fan-out above a few keep a cached sorted prefix (no pointer chasing on the next draft),
  // rebuilt only after their children change.
  struct Kid {
    double count;
    int32_t token, node;
  };
  // The best min(room, n_children) children of `node`, sorted: sets *len and returns them.
  // A node with at most kSmallFanout children is read straight from its child list into
  // `small` (caller storage for kSmallFanout Kids): one memory access per child instead of
  // three for a cache lookup. Otherwise the result is the node's cached list, valid until
  // that list is rebuilt (a later call for the same node with a larger room, or after its
  // children changed) or the cache is cleared, which only reserve_cache() does. Caller
  // holds cache_mutex().
  static constexpr int32_t kSmallFanout = 2;
  const Kid* best_children(int32_t node, int32_t room, int32_t* len, Kid* small) const;
  // Clears the cache if `n` more lists would pass its bound, so that the next n
  // best_children() calls never invalidate each other. Caller holds cache_mutex().
  void reserve_cache(int32_t n) const;
  std::mutex& cache_mutex() const { return cache_mu_; }

 private:
  // Count the windows seq[i : i + max_depth] (clipped to n), skipping their first
  // max(0, skip_before - i) nodes, which were counted before. Level-synchronous over all
  // windows so that the hash probes of different windows overlap (prefetch).
  void count_windows(const int32_t* seq, int64_t n, int64_t skip_before, double weight);  // caller holds lock
  int32_t add_node(int32_t parent, int32_t token);
  void prune();  // decay counts, drop low-count subtrees, compact

  int32_t max_depth_;
  int64_t vocab_size_, max_nodes_;
  double decay_;
  int64_t prunes_ = 0;
  std::vector<Node, HugePageAllocator<Node>> nodes_;
  EdgeMap edges_;
  std::vector<int32_t> win_node_;          // count_windows scratch (under the write lock):
  std::vector<uint64_t> win_key_, win_hash_;  // per active window: node, edge key, hash
  mutable std::shared_mutex mu_;
  // Best children per node (sorted): Node::cache indexes cache_lists_, valid if that list's
  // owner is the node. Guarded by cache_mu_ (readers share mu_); cleared by prune() and by
  // reserve_cache() when it grows too big. A list is valid while the node's count and child
  // count are those it was built at: every window that recounts a child also recounts its
  // parent, except the first counted depth of an extend(), which sets `dirty` instead.
  struct CachedKids {
    int32_t owner;
    int32_t n_children;
    double parent_count;
    std::vector<Kid> kids;
  };
  mutable std::vector<CachedKids> cache_lists_;
  mutable std::mutex cache_mu_;
};

// The cost-aware cut, shared by a single draft and a batch of drafts verified together.
// chance[r][i] = empirical chance that row r's text follows its node of rank i (best-first
// order, so ranks < b form a subtree); rows are padded to the widest, so the batch pays
// cost[b] for b nodes per row. Returns the b in [0, min(max size, cost_len - 1)] that
// maximises sum over rows of (1 + sum_{i < min(b, size_r)} chance[r][i]) / cost[b],
// the first such b on ties.
int32_t best_budget(const double* const* chance, const int32_t* sizes, int rows, const double* cost,
                    int32_t cost_len);
// The ragged cut, for a batch whose rows' trees are verified back to back (no padding): per row,
// how many best-first nodes to keep, taking nodes across rows by chance (best first, each row in
// rank order) and keeping the m that maximises (rows + the sum of the kept chances) /
// cost(m / rows), the cost curve read at the mean nodes per row (linear between its points).
std::vector<int32_t> ragged_budgets(const double* const* chance, const int32_t* sizes, int rows, const double* cost,
                                    int32_t cost_len);
// chance[i] of tree t's node of rank i: min(1, counts / root_count), written to out[n].
void chance_by_rank(const DraftTree& t, double* out);
// The subtree of t's nodes with rank < b, in the same DFS order (b >= t.n: a copy).
DraftTree prefix(const DraftTree& t, int32_t b);

// Draft from the union of several pools: each pool matches its own longest context
// suffix; a tree node's count is the weighted sum of the pools' counts for that path.
// Growth is best-first by count, ties broken by (depth asc, token asc, parent asc), so
// the result is deterministic and never exceeds params.budget nodes.
DraftTree draft(const Pool* const* pools, const double* weights, int n_pools,
                const int32_t* ctx, int64_t n_ctx, const DraftParams& params);

}  // namespace laser
