#include "trie.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <mutex>
#include <queue>

namespace laser {

// ---------------------------------------------------------------- EdgeMap

void EdgeMap::reserve(size_t n_edges) {
  size_t cap = 16;
  while (cap < 2 * n_edges) cap <<= 1;
  if (cap <= slots_.size()) return;
  std::vector<Slot> old(cap, Slot{kEmpty, -1});
  old.swap(slots_);
  mask_ = cap - 1;
  for (const Slot& s : old) {
    if (s.key == kEmpty) continue;
    size_t i = hash(s.key) & mask_;
    while (slots_[i].key != kEmpty) i = (i + 1) & mask_;
    slots_[i] = s;
  }
}

int32_t EdgeMap::find(uint64_t k, uint64_t h) const {
  if (slots_.empty()) return -1;
  for (size_t i = h & mask_;; i = (i + 1) & mask_) {
    if (slots_[i].key == k) return int32_t(slots_[i].child);
    if (slots_[i].key == kEmpty) return -1;
  }
}

void EdgeMap::insert(uint64_t k, uint64_t h, int32_t child) {
  if (2 * (size_ + 1) > slots_.size()) reserve(std::max<size_t>(8, slots_.size()));
  size_t i = h & mask_;
  while (slots_[i].key != kEmpty) i = (i + 1) & mask_;
  slots_[i] = Slot{k, child};
  ++size_;
}

void EdgeMap::clear() {
  std::fill(slots_.begin(), slots_.end(), Slot{kEmpty, -1});
  size_ = 0;
}

// ---------------------------------------------------------------- Pool

Pool::Pool(int32_t max_depth, int64_t vocab_size, int64_t max_nodes, double decay)
    : max_depth_(max_depth), vocab_size_(vocab_size), max_nodes_(max_nodes), decay_(decay) {
  if (max_depth < 1 || max_depth > 1024) throw std::invalid_argument("max_depth must be in [1, 1024]");
  if (vocab_size < 0 || vocab_size > (int64_t(1) << 31)) throw std::invalid_argument("vocab_size must be in [0, 2^31]");
  if (max_nodes < 4 * int64_t(max_depth) + 4 || max_nodes > (int64_t(1) << 31) - 1)
    throw std::invalid_argument("max_nodes must be in [4 * max_depth + 4, 2^31 - 1]");
  if (!(decay > 0.0 && decay <= 1.0)) throw std::invalid_argument("decay must be in (0, 1]");
  nodes_.push_back(Node{-1, -1, -1, -1, 0, 0, 0, 0, 0.0});
}

void Pool::check_tokens(const int32_t* tokens, int64_t n) const {
  for (int64_t i = 0; i < n; ++i) {
    if (tokens[i] < 0 || (vocab_size_ > 0 && tokens[i] >= vocab_size_)) {
      throw std::invalid_argument("token id " + std::to_string(tokens[i]) + " at position " + std::to_string(i) +
                                  " is out of range [0, " +
                                  (vocab_size_ > 0 ? std::to_string(vocab_size_) : std::string("2^31")) + ")");
    }
  }
}

int32_t Pool::add_node(int32_t parent, int32_t token) {
  const int32_t id = int32_t(nodes_.size());
  Node& p = nodes_[parent];
  nodes_.push_back(Node{token, parent, -1, p.first_child, 0, int16_t(p.depth + 1), 0, 0, 0.0});
  Node& q = nodes_[parent];  // `p` may dangle after push_back
  q.first_child = id;
  q.n_children += 1;
  q.dirty = 1;
  edges_.insert(parent, token, id);
  return id;
}

void Pool::count_windows(const int32_t* seq, int64_t n, int64_t skip_before, double weight) {
  // Windows are processed in chunks small enough that a chunk can never overflow
  // max_nodes, so node ids held across levels stay valid (prune() only runs between chunks).
  const int64_t chunk = std::max<int64_t>(1, (max_nodes_ / 4) / max_depth_);
  thread_local std::vector<int32_t> cur_;
  thread_local std::vector<uint64_t> keys_, hashes_;
  auto &cur = cur_;
  auto &keys = keys_, &hashes = hashes_;
  for (int64_t lo = 0; lo < n; lo += chunk) {
    const int64_t hi = std::min(n, lo + chunk);
    if (int64_t(nodes_.size()) + (hi - lo) * max_depth_ > max_nodes_) prune();
    cur.assign(hi - lo, 0);
    keys.resize(hi - lo);
    hashes.resize(hi - lo);
    for (int64_t i = lo; i < hi; ++i)
      if (skip_before - i <= 0) nodes_[0].count += weight;
    for (int64_t d = 1; d <= max_depth_; ++d) {
      // windows still active at depth d: start i with i + d <= n, i.e. i <= n - d
      const int64_t end = std::min(hi, n - d + 1);
      if (end <= lo) break;
      for (int64_t i = lo; i < end; ++i) {
        keys[i - lo] = EdgeMap::key(cur[i - lo], seq[i + d - 1]);
        hashes[i - lo] = EdgeMap::hash(keys[i - lo]);
        edges_.prefetch(hashes[i - lo]);
      }
      for (int64_t i = lo; i < end; ++i) {
        int32_t c = edges_.find(keys[i - lo], hashes[i - lo]);
        if (c < 0) c = add_node(cur[i - lo], seq[i + d - 1]);
        cur[i - lo] = c;
        __builtin_prefetch(&nodes_[c]);
      }
      for (int64_t i = lo; i < end; ++i) {
        const int64_t skip = skip_before - i;
        if (d <= skip) continue;
        Node& nd = nodes_[cur[i - lo]];
        nd.count += weight;
        if (d == skip + 1 && skip > 0) nodes_[nd.parent].dirty = 1;  // parent not recounted
      }
    }
  }
}

void Pool::insert(const int32_t* tokens, int64_t n, double weight) {
  check_tokens(tokens, n);
  std::unique_lock<std::shared_mutex> lock(mu_);
  count_windows(tokens, n, 0, weight);
}

void Pool::extend(const int32_t* prefix, int64_t n_prefix, const int32_t* tokens, int64_t n, double weight) {
  check_tokens(tokens, n);
  const int64_t p = std::min<int64_t>(n_prefix, max_depth_ - 1);
  check_tokens(prefix + n_prefix - p, p);
  // seq = last p tokens of prefix + tokens; a window starting at i < p gains depths > p - i.
  std::vector<int32_t> seq(prefix + n_prefix - p, prefix + n_prefix);
  seq.insert(seq.end(), tokens, tokens + n);
  std::unique_lock<std::shared_mutex> lock(mu_);
  count_windows(seq.data(), int64_t(seq.size()), p, weight);
}

int64_t Pool::size() const {
  std::shared_lock<std::shared_mutex> lock(mu_);
  return int64_t(nodes_.size());
}

int64_t Pool::memory_bytes() const {
  std::shared_lock<std::shared_mutex> lock(mu_);
  std::lock_guard<std::mutex> cache_lock(cache_mu_);
  size_t cached = cache_slot_.capacity() * sizeof(int32_t);
  for (const auto& l : cache_lists_) cached += l.kids.capacity() * sizeof(Kid) + sizeof(l);
  return int64_t(nodes_.capacity() * sizeof(Node) + edges_.memory_bytes() + cached + sizeof(Pool));
}

double Pool::count(const int32_t* tokens, int64_t n) const {
  std::shared_lock<std::shared_mutex> lock(mu_);
  int32_t node = 0;
  for (int64_t i = 0; i < n && node >= 0; ++i) node = edges_.find(node, tokens[i]);
  return node < 0 ? 0.0 : nodes_[node].count;
}

int32_t Pool::match(const int32_t* ctx, int64_t n, int32_t min_match, int32_t max_match, int32_t* len) const {
  for (int64_t L = std::min<int64_t>({int64_t(max_match), n, int64_t(max_depth_) - 1}); L >= min_match; --L) {
    int32_t node = 0;
    for (int64_t i = n - L; i < n && node >= 0; ++i) node = edges_.find(node, ctx[i]);
    if (node >= 0 && nodes_[node].first_child >= 0) {
      *len = int32_t(L);
      return node;
    }
  }
  *len = 0;
  return -1;
}

void Pool::best_children(int32_t node, int32_t room, std::vector<Kid>& out) const {
  const Node& v = nodes_[node];
  if (room <= 0 || v.n_children == 0) return;
  auto scan = [&](int32_t keep, std::vector<Kid>& dst) {
    dst.clear();
    for (int32_t c = v.first_child; c >= 0; c = nodes_[c].next_sibling) dst.push_back(Kid{nodes_[c].count, nodes_[c].token, c});
    auto better = [](const Kid& a, const Kid& b) { return a.count != b.count ? a.count > b.count : a.token < b.token; };
    if (int32_t(dst.size()) > keep) {
      std::nth_element(dst.begin(), dst.begin() + keep, dst.end(), better);
      dst.resize(keep);
    }
    std::sort(dst.begin(), dst.end(), better);
  };
  constexpr int32_t kCacheKeep = 16;
  if (cache_slot_.size() < nodes_.size()) cache_slot_.resize(nodes_.size(), -1);
  int32_t& slot = cache_slot_[node];
  if (slot < 0) {
    if (int64_t(cache_lists_.size()) >= std::max<int64_t>(4096, max_nodes_ / 8)) {  // bound memory
      std::fill(cache_slot_.begin(), cache_slot_.end(), -1);
      cache_lists_.clear();
    }
    slot = int32_t(cache_lists_.size());
    cache_lists_.push_back(CachedKids{-1.0, -1, {}});
  }
  CachedKids& c = cache_lists_[slot];
  if (v.dirty || c.parent_count != v.count || c.n_children != v.n_children ||
      int32_t(c.kids.size()) < std::min(room, v.n_children)) {
    scan(std::max(room, kCacheKeep), c.kids);
    c.parent_count = v.count;
    c.n_children = v.n_children;
    v.dirty = 0;
  }
  out.insert(out.end(), c.kids.begin(), c.kids.begin() + std::min<size_t>(c.kids.size(), size_t(room)));
}

// Decay every count, then drop the lowest-count nodes (and their subtrees) until at
// most 3/4 of max_nodes remain, and renumber breadth-first so parent < child again.
// Among equal counts the deepest nodes go first, so ties do not cascade into subtrees.
void Pool::prune() {
  ++prunes_;
  for (Node& nd : nodes_) nd.count *= decay_;
  const int64_t n = int64_t(nodes_.size());
  const int64_t k = n - max_nodes_ * 3 / 4;  // at least k non-root nodes must go
  std::vector<uint8_t> drop(n, 0);
  if (k > 0) {
    std::vector<int32_t> idx(n - 1);
    for (int64_t i = 1; i < n; ++i) idx[i - 1] = int32_t(i);
    auto lower = [&](int32_t a, int32_t b) {  // a goes before b
      const Node &x = nodes_[a], &y = nodes_[b];
      if (x.count != y.count) return x.count < y.count;
      if (x.depth != y.depth) return x.depth > y.depth;
      return a > b;
    };
    std::nth_element(idx.begin(), idx.begin() + (k - 1), idx.end(), lower);
    for (int64_t i = 0; i < k; ++i) drop[idx[i]] = 1;
  }
  std::vector<Node> kept;
  kept.reserve(n - std::max<int64_t>(k, 0) + max_depth_);
  kept.push_back(Node{-1, -1, -1, -1, 0, 0, 1, 0, nodes_[0].count});
  edges_.clear();
  cache_slot_.clear();
  cache_lists_.clear();
  // BFS over kept nodes (a dropped node's subtree goes with it); old index of kept[j] is old[j].
  std::vector<int32_t> old{0};
  old.reserve(kept.capacity());
  for (size_t j = 0; j < old.size(); ++j) {
    for (int32_t c = nodes_[old[j]].first_child; c >= 0; c = nodes_[c].next_sibling) {
      if (drop[c]) continue;
      const int32_t id = int32_t(kept.size());
      Node nd = nodes_[c];
      nd.parent = int32_t(j);
      nd.first_child = -1;
      nd.n_children = 0;
      nd.dirty = 1;
      nd.next_sibling = kept[j].first_child;
      kept[j].first_child = id;
      kept[j].n_children += 1;
      kept.push_back(nd);
      old.push_back(c);
      edges_.insert(int32_t(j), nd.token, id);
    }
  }
  nodes_.swap(kept);
}

// ---------------------------------------------------------------- persistence

namespace {
constexpr char kMagic[8] = {'L', 'S', 'R', 'P', 'O', 'O', 'L', '\0'};
constexpr uint32_t kVersion = 1;
struct Header {
  char magic[8];
  uint32_t version, max_depth;
  int64_t vocab_size, max_nodes;
  double decay;
  int64_t n_nodes;
};
struct Record {
  int32_t token, parent;
  double count;
};
static_assert(sizeof(Header) == 48 && sizeof(Record) == 16, "packed file layout");

uint64_t fnv1a(const char* p, size_t n) {
  uint64_t h = 0xcbf29ce484222325ULL;
  for (size_t i = 0; i < n; ++i) h = (h ^ uint8_t(p[i])) * 0x100000001b3ULL;
  return h;
}
}  // namespace

void Pool::save(const std::string& path) const {
  std::shared_lock<std::shared_mutex> lock(mu_);
  std::vector<char> buf(sizeof(Header) + nodes_.size() * sizeof(Record));
  Header h;
  std::memcpy(h.magic, kMagic, 8);
  h.version = kVersion;
  h.max_depth = uint32_t(max_depth_);
  h.vocab_size = vocab_size_;
  h.max_nodes = max_nodes_;
  h.decay = decay_;
  h.n_nodes = int64_t(nodes_.size());
  std::memcpy(buf.data(), &h, sizeof(h));
  Record* rec = reinterpret_cast<Record*>(buf.data() + sizeof(Header));
  for (size_t i = 0; i < nodes_.size(); ++i) rec[i] = Record{nodes_[i].token, nodes_[i].parent, nodes_[i].count};
  const uint64_t sum = fnv1a(buf.data(), buf.size());
  // Write next to the target, then rename: a crash never leaves a half-written pool.
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    if (!f) throw PoolIOError("cannot open '" + tmp + "' for writing");
    f.write(buf.data(), std::streamsize(buf.size()));
    f.write(reinterpret_cast<const char*>(&sum), sizeof(sum));
    f.flush();
    if (!f) throw PoolIOError("error writing '" + tmp + "'");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) throw PoolIOError("cannot rename '" + tmp + "' to '" + path + "'");
}

std::unique_ptr<Pool> Pool::load(const std::string& path) {
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  if (!f) throw PoolIOError("cannot open pool file '" + path + "'");
  const std::streamoff size = f.tellg();
  const std::string where = "pool file '" + path + "': ";
  if (size < std::streamoff(sizeof(Header) + sizeof(uint64_t))) throw PoolFormatError(where + "truncated header");
  std::vector<char> buf(static_cast<size_t>(size));
  f.seekg(0);
  f.read(buf.data(), size);
  if (!f) throw PoolFormatError(where + "read error");
  Header h;
  std::memcpy(&h, buf.data(), sizeof(h));
  if (std::memcmp(h.magic, kMagic, 8) != 0) throw PoolFormatError(where + "not a LASER pool (bad magic bytes)");
  if (h.version != kVersion) throw PoolFormatError(where + "unsupported version " + std::to_string(h.version));
  if (h.n_nodes < 1 || h.n_nodes > (int64_t(1) << 31) ||
      size != std::streamoff(sizeof(Header) + h.n_nodes * sizeof(Record) + sizeof(uint64_t)))
    throw PoolFormatError(where + "truncated or padded (size does not match node count)");
  uint64_t sum;
  std::memcpy(&sum, buf.data() + size - sizeof(sum), sizeof(sum));
  if (sum != fnv1a(buf.data(), buf.size() - sizeof(sum))) throw PoolFormatError(where + "checksum mismatch");
  std::unique_ptr<Pool> owner;
  try {
    owner = std::make_unique<Pool>(int32_t(h.max_depth), h.vocab_size, std::max<int64_t>(h.max_nodes, h.n_nodes), h.decay);
  } catch (const std::invalid_argument& e) {
    throw PoolFormatError(where + "bad header: " + e.what());
  }
  Pool& pool = *owner;
  const Record* rec = reinterpret_cast<const Record*>(buf.data() + sizeof(Header));
  if (rec[0].token != -1 || rec[0].parent != -1) throw PoolFormatError(where + "bad root record");
  pool.nodes_[0].count = rec[0].count;
  pool.nodes_.reserve(size_t(h.n_nodes));
  pool.edges_.reserve(size_t(h.n_nodes));
  for (int64_t i = 1; i < h.n_nodes; ++i) {
    const Record& r = rec[i];
    if (r.parent < 0 || r.parent >= i || r.token < 0 || (h.vocab_size > 0 && r.token >= h.vocab_size) ||
        !(r.count >= 0.0) || !std::isfinite(r.count) || pool.nodes_[r.parent].depth >= pool.max_depth_ ||
        pool.edges_.find(r.parent, r.token) >= 0)
      throw PoolFormatError(where + "invalid node record " + std::to_string(i));
    pool.nodes_[pool.add_node(r.parent, r.token)].count = r.count;
  }
  return owner;
}

// ---------------------------------------------------------------- draft + flatten

namespace {
struct Cand {
  double count;
  int32_t depth, token, parent;  // parent: selection index, -1 for the context
  int32_t kid, end;              // this candidate's slot in the sibling list [.., end) of the arena
};
// true if a is a better candidate than b; a strict total order
bool better(const Cand& a, const Cand& b) {
  if (a.count != b.count) return a.count > b.count;
  if (a.depth != b.depth) return a.depth < b.depth;
  if (a.token != b.token) return a.token < b.token;
  return a.parent < b.parent;
}
struct Worse {
  bool operator()(const Cand& a, const Cand& b) const { return better(b, a); }
};
}  // namespace

DraftTree draft(const Pool* const* pools, const double* weights, int n_pools, const int32_t* ctx, int64_t n_ctx,
                const DraftParams& prm) {
  if (prm.budget < 0 || prm.max_depth < 1 || prm.min_match < 1 || prm.max_match < prm.min_match)
    throw std::invalid_argument("need budget >= 0, max_depth >= 1, 1 <= min_match <= max_match");
  if (prm.cost && prm.cost_len < 1) throw std::invalid_argument("cost curve must not be empty");
  if (!(prm.confidence > 0.0 && prm.confidence <= 1.0)) throw std::invalid_argument("confidence must be in (0, 1]");
  const int P = n_pools;
  for (int p = 0; p < P; ++p) pools[p]->check_tokens(ctx, n_ctx);
  // Each distinct pool: shared lock on its trie, and its child cache held for the whole draft
  // (one lock per call instead of one per expanded node).
  std::vector<std::shared_lock<std::shared_mutex>> locks;
  std::vector<std::unique_lock<std::mutex>> cache_locks;
  for (int p = 0; p < P; ++p) {
    if (std::find(pools, pools + p, pools[p]) == pools + p) {
      locks.emplace_back(pools[p]->mutex());
      cache_locks.emplace_back(pools[p]->cache_mutex());
    }
  }
  // Each pool matches its own longest suffix; the root's count sums the matched nodes.
  std::vector<int32_t> ids(P);
  DraftTree t;
  double root_count = 0.0;
  for (int p = 0; p < P; ++p) {
    int32_t len = 0;
    ids[p] = pools[p]->match(ctx, n_ctx, prm.min_match, prm.max_match, &len);
    if (ids[p] >= 0) root_count += weights[p] * pools[p]->nodes()[ids[p]].count;
    t.match_len = std::max(t.match_len, len);
  }
  t.root_count = root_count;
  int32_t budget = prm.budget;
  if (prm.cost) budget = std::min(budget, prm.cost_len - 1);

  // Best-first growth with lazy siblings: an expanded node puts its sorted child list in
  // the arena and only its best child on the heap; popping a child pushes its next
  // sibling. Same selection as pushing every child, in O(budget log budget).
  // Scratch buffers live per thread: a draft allocates nothing once they are warm.
  using Kid = Pool::Kid;
  struct Scratch {
    std::vector<Cand> sel;         // selected nodes, best-first order
    std::vector<int32_t> sel_ids;  // [len(sel), P] per-pool node ids (-1: absent in that pool)
    std::vector<Kid> arena;        // sibling lists, weighted counts
    std::vector<int32_t> arena_ids;  // [len(arena), P]
    std::vector<Cand> heap;        // binary heap under Worse
    std::vector<Kid> best;
    std::vector<std::pair<Kid, int>> merged;  // (kid, pool) for P > 1
    std::vector<int32_t> head, tail, next, dfs_of, order, stack;
    std::vector<uint8_t> is_leaf;
  };
  static thread_local Scratch scratch;  // one TLS lookup per call, not per use
  Scratch& S = scratch;
  auto& sel = S.sel;
  auto& heap = S.heap;
  auto &arena = S.arena, &best = S.best;
  auto &sel_ids = S.sel_ids, &arena_ids = S.arena_ids;
  auto& merged = S.merged;
  sel.clear(), sel_ids.clear(), arena.clear(), arena_ids.clear(), heap.clear();
  auto heap_push = [&heap](const Cand& c) { heap.push_back(c); std::push_heap(heap.begin(), heap.end(), Worse{}); };

  auto expand = [&](const int32_t* pid, int32_t depth, int32_t parent_sel, int32_t room) {
    if (depth >= prm.max_depth || room <= 0) return;
    const int32_t start = int32_t(arena.size());
    if (P == 1) {  // the cached list goes straight into the arena
      pools[0]->best_children(pid[0], room, arena);
      for (int32_t i = start; i < int32_t(arena.size()); ++i) {
        arena[i].count *= weights[0];
        arena_ids.push_back(arena[i].node);
      }
    } else {  // each pool offers its best `room`; equal tokens are summed
      merged.clear();
      for (int p = 0; p < P; ++p) {
        if (pid[p] < 0) continue;
        best.clear();
        pools[p]->best_children(pid[p], room, best);
        for (const Kid& k : best) merged.emplace_back(Kid{weights[p] * k.count, k.token, k.node}, p);
      }
      std::sort(merged.begin(), merged.end(), [](const auto& a, const auto& b) { return a.first.token < b.first.token; });
      const int32_t first = int32_t(arena.size());
      for (size_t i = 0; i < merged.size(); ++i) {
        if (i == 0 || merged[i].first.token != merged[i - 1].first.token) {
          arena.push_back(Kid{0.0, merged[i].first.token, 0});
          arena_ids.insert(arena_ids.end(), P, -1);
        }
        arena.back().count += merged[i].first.count;
        arena_ids[(arena.size() - 1) * P + merged[i].second] = merged[i].first.node;
      }
      // sort the merged list best first (count desc, token asc), keeping ids aligned
      std::vector<int32_t> order(arena.size() - first);
      for (size_t i = 0; i < order.size(); ++i) order[i] = first + int32_t(i);
      std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
        return arena[a].count != arena[b].count ? arena[a].count > arena[b].count : arena[a].token < arena[b].token;
      });
      if (int32_t(order.size()) > room) order.resize(room);
      std::vector<Kid> sorted_kids;
      std::vector<int32_t> sorted_ids;
      for (int32_t o : order) {
        sorted_kids.push_back(arena[o]);
        sorted_ids.insert(sorted_ids.end(), arena_ids.begin() + size_t(o) * P, arena_ids.begin() + size_t(o + 1) * P);
      }
      arena.resize(first);
      arena_ids.resize(size_t(first) * P);
      arena.insert(arena.end(), sorted_kids.begin(), sorted_kids.end());
      arena_ids.insert(arena_ids.end(), sorted_ids.begin(), sorted_ids.end());
    }
    const int32_t end = int32_t(arena.size());
    if (end > start) heap_push(Cand{arena[start].count, depth + 1, arena[start].token, parent_sel, start, end});
  };

  sel.reserve(budget);
  sel_ids.reserve(size_t(budget) * P);
  if (t.match_len > 0) expand(ids.data(), 0, -1, budget);
  while (int32_t(sel.size()) < budget && !heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), Worse{});
    const Cand c = heap.back();
    heap.pop_back();
    const int32_t s = int32_t(sel.size());
    sel.push_back(c);
    sel_ids.insert(sel_ids.end(), arena_ids.begin() + size_t(c.kid) * P, arena_ids.begin() + size_t(c.kid + 1) * P);
    if (c.kid + 1 < c.end) {
      const Kid& k = arena[c.kid + 1];
      heap_push(Cand{k.count, c.depth, k.token, c.parent, c.kid + 1, c.end});
    }
    expand(sel_ids.data() + size_t(s) * P, c.depth, s, budget - s - 1);
  }

  // Cost-aware cut: keep the best-first prefix maximising (1 + E[accepted]) / cost.
  int32_t n = int32_t(sel.size());
  if (prm.cost && n > 0 && root_count > 0.0) {
    double gain = 1.0, best = 1.0 / prm.cost[0];
    int32_t best_b = 0;
    for (int32_t b = 1; b <= n; ++b) {
      gain += prm.confidence * std::min(1.0, sel[b - 1].count / root_count);
      const double score = gain / prm.cost[b];
      if (score > best) best = score, best_b = b;
    }
    n = best_b;
  }

  // Flatten depth-first. Children of a node are visited in selection (best-first) order.
  auto &head = S.head, &tail = S.tail, &next = S.next, &dfs_of = S.dfs_of, &order = S.order, &stack = S.stack;
  head.assign(n + 1, -1), tail.assign(n + 1, -1), next.assign(n, -1);  // slot n = context
  for (int32_t s = 0; s < n; ++s) {
    const int32_t p = sel[s].parent < 0 ? n : sel[s].parent;
    if (tail[p] < 0) head[p] = s; else next[tail[p]] = s;
    tail[p] = s;
  }
  dfs_of.assign(n, 0), order.clear(), stack.clear();
  for (int32_t c = head[n]; c >= 0; c = next[c]) stack.push_back(c);
  std::reverse(stack.begin(), stack.end());
  while (!stack.empty()) {
    const int32_t s = stack.back();
    stack.pop_back();
    dfs_of[s] = int32_t(order.size());
    order.push_back(s);
    const size_t mark = stack.size();
    for (int32_t c = head[s]; c >= 0; c = next[c]) stack.push_back(c);
    std::reverse(stack.begin() + mark, stack.end());
  }
  t.n = n;
  t.tokens.resize(n);
  t.parents.resize(n);
  t.depth.resize(n);
  t.counts.resize(n);
  t.rank.assign(order.begin(), order.end());
  t.mask.assign(size_t(n) * n, 0);
  auto& is_leaf = S.is_leaf;
  is_leaf.assign(n, 1);
  for (int32_t i = 0; i < n; ++i) {
    const Cand& c = sel[order[i]];
    t.tokens[i] = c.token;
    t.parents[i] = c.parent < 0 ? -1 : dfs_of[c.parent];
    t.depth[i] = c.depth;
    t.counts[i] = float(c.count);
    uint8_t* row = t.mask.data() + size_t(i) * n;
    if (t.parents[i] >= 0) {
      std::memcpy(row, t.mask.data() + size_t(t.parents[i]) * n, size_t(t.parents[i]) + 1);
      is_leaf[t.parents[i]] = 0;
    }
    row[i] = 1;
  }
  for (int32_t i = 0; i < n; ++i) {
    if (!is_leaf[i]) continue;
    ++t.n_paths;
    t.path_width = std::max(t.path_width, t.depth[i]);
  }
  t.paths.assign(size_t(t.n_paths) * t.path_width, -1);
  for (int32_t i = 0, row = 0; i < n; ++i) {
    if (!is_leaf[i]) continue;
    for (int32_t j = i; j >= 0; j = t.parents[j]) t.paths[size_t(row) * t.path_width + t.depth[j] - 1] = j;
    ++row;
  }
  return t;
}

}  // namespace laser
