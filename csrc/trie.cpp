#include "trie.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <mutex>
#include <queue>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace laser {

// ---------------------------------------------------------------- allocation

void* huge_page_alloc(size_t bytes) {
  constexpr size_t kHuge = size_t(2) << 20;
  if (bytes < kHuge) return std::malloc(bytes);
  const size_t rounded = (bytes + kHuge - 1) / kHuge * kHuge;
  void* p = std::aligned_alloc(kHuge, rounded);
#ifdef MADV_HUGEPAGE
  if (p) madvise(p, rounded, MADV_HUGEPAGE);  // a hint: ignored where THP is off
#endif
  return p;
}

// ---------------------------------------------------------------- EdgeMap

void EdgeMap::reserve(size_t n_edges) {
  size_t cap = 16;
  while (cap < 2 * n_edges) cap <<= 1;
  if (cap <= slots_.size()) return;
  decltype(slots_) old(cap, Slot{kEmpty, -1});
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
  nodes_.push_back(Node{-1, -1, -1, 0, -1, 0, 0, 0, 0.0});
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
  nodes_.push_back(Node{token, -1, p.first_child, 0, -1, int16_t(p.depth + 1), 0, 0, 0.0});
  Node& q = nodes_[parent];  // `p` may dangle after push_back
  q.first_child = id;
  q.n_children += 1;
  q.dirty = 1;
  edges_.insert(parent, token, id);
  return id;
}

void Pool::count_windows(const int32_t* seq, int64_t n, int64_t skip_before, double weight) {
  constexpr int32_t kWalkChildren = 1;
  constexpr uint64_t kWalk = ~uint64_t(0);  // never a real key: tokens are < 2^31
  // Windows are processed in chunks small enough that a chunk can never overflow
  // max_nodes, so node ids held across levels stay valid (prune() only runs between chunks).
  const int64_t chunk = std::max<int64_t>(1, (max_nodes_ / 4) / max_depth_);
  auto &cur = win_node_;
  auto &keys = win_key_, &hashes = win_hash_;
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
      // A parent with at most one child (most nodes below depth 2) is searched through its
      // child list: the hit is the node whose count we update anyway, so it costs one
      // memory access instead of a hash slot plus the node (2x faster re-inserts; a
      // limit of 2 measured the same, 4 slower). keys[] = kWalk marks those windows.
      for (int64_t i = lo; i < end; ++i) {
        const Node& p = nodes_[cur[i - lo]];  // in cache: counted at depth d - 1
        if (p.n_children <= kWalkChildren) {
          keys[i - lo] = kWalk;
          if (p.first_child >= 0) __builtin_prefetch(&nodes_[p.first_child]);
          continue;
        }
        keys[i - lo] = EdgeMap::key(cur[i - lo], seq[i + d - 1]);
        hashes[i - lo] = EdgeMap::hash(keys[i - lo]);
        edges_.prefetch(hashes[i - lo]);
      }
      for (int64_t i = lo; i < end; ++i) {
        const int32_t token = seq[i + d - 1];
        int32_t c = -1;
        if (keys[i - lo] == kWalk) {
          for (c = nodes_[cur[i - lo]].first_child; c >= 0 && nodes_[c].token != token;) c = nodes_[c].next_sibling;
        } else {
          c = edges_.find(keys[i - lo], hashes[i - lo]);
        }
        if (c < 0) c = add_node(cur[i - lo], token);
        const int64_t skip = skip_before - i;
        if (d == skip + 1 && skip > 0) nodes_[cur[i - lo]].dirty = 1;  // parent not recounted
        cur[i - lo] = c;
        __builtin_prefetch(&nodes_[c]);
      }
      for (int64_t i = lo; i < end; ++i)
        if (d > skip_before - i) nodes_[cur[i - lo]].count += weight;
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
  size_t cached = 0;
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

void Pool::reserve_cache(int32_t n) const {
  if (int64_t(cache_lists_.size()) + n > std::max<int64_t>(4096, max_nodes_ / 8)) {  // bound memory
    cache_lists_.clear();  // every Node::cache is now stale
  }
}

const Pool::Kid* Pool::best_children(int32_t node, int32_t room, int32_t* len, Kid* small) const {
  const Node& v = nodes_[node];
  *len = std::min(room, v.n_children);
  if (*len <= 0) return nullptr;
  if (v.n_children <= kSmallFanout) {
    int32_t k = 0;
    for (int32_t c = v.first_child; c >= 0; c = nodes_[c].next_sibling) small[k++] = Kid{nodes_[c].count, nodes_[c].token, c};
    if (k == 2 && (small[1].count > small[0].count || (small[1].count == small[0].count && small[1].token < small[0].token)))
      std::swap(small[0], small[1]);
    return small;
  }
  constexpr int32_t kCacheKeep = 16;
  if (v.cache < 0 || size_t(v.cache) >= cache_lists_.size() || cache_lists_[v.cache].owner != node) {
    v.cache = int32_t(cache_lists_.size());
    cache_lists_.push_back(CachedKids{node, -1, -1.0, {}});
  }
  CachedKids& c = cache_lists_[v.cache];
  if (v.dirty || c.parent_count != v.count || c.n_children != v.n_children || int32_t(c.kids.size()) < *len) {
    const int32_t keep = std::max(room, kCacheKeep);
    auto better = [](const Kid& a, const Kid& b) { return a.count != b.count ? a.count > b.count : a.token < b.token; };
    c.kids.clear();
    for (int32_t k = v.first_child; k >= 0; k = nodes_[k].next_sibling) c.kids.push_back(Kid{nodes_[k].count, nodes_[k].token, k});
    if (int32_t(c.kids.size()) > keep) {
      std::nth_element(c.kids.begin(), c.kids.begin() + keep, c.kids.end(), better);
      c.kids.resize(keep);
    }
    std::sort(c.kids.begin(), c.kids.end(), better);
    c.parent_count = v.count;
    c.n_children = v.n_children;
    v.dirty = 0;
  }
  return c.kids.data();
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
  std::vector<Node, HugePageAllocator<Node>> kept;
  kept.reserve(n - std::max<int64_t>(k, 0) + max_depth_);
  kept.push_back(Node{-1, -1, -1, 0, -1, 0, 1, 0, nodes_[0].count});
  edges_.clear();
  cache_lists_.clear();
  // BFS over kept nodes (a dropped node's subtree goes with it); old index of kept[j] is old[j].
  std::vector<int32_t> old{0};
  old.reserve(kept.capacity());
  for (size_t j = 0; j < old.size(); ++j) {
    for (int32_t c = nodes_[old[j]].first_child; c >= 0; c = nodes_[c].next_sibling) {
      if (drop[c]) continue;
      const int32_t id = int32_t(kept.size());
      Node nd = nodes_[c];
      nd.first_child = -1;
      nd.cache = -1;
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
  std::vector<int32_t> parent(nodes_.size(), -1);
  for (size_t i = 0; i < nodes_.size(); ++i)
    for (int32_t c = nodes_[i].first_child; c >= 0; c = nodes_[c].next_sibling) parent[c] = int32_t(i);
  for (size_t i = 0; i < nodes_.size(); ++i) rec[i] = Record{nodes_[i].token, parent[i], nodes_[i].count};
  const uint64_t sum = fnv1a(buf.data(), buf.size());
  // Write next to the target, then rename: a crash never leaves a half-written pool.
  const std::string tmp = path + ".tmp";
  auto fail = [&](const std::string& what) {
    const std::string reason = errno ? std::string(": ") + std::strerror(errno) : std::string();
    std::remove(tmp.c_str());
    throw PoolIOError(what + " '" + tmp + "'" + reason);
  };
  errno = 0;
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    if (!f) fail("cannot open for writing");
    f.write(buf.data(), std::streamsize(buf.size()));
    f.write(reinterpret_cast<const char*>(&sum), sizeof(sum));
    f.flush();
    if (!f) fail("error writing");
    f.close();
    if (!f) fail("error writing");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) fail("cannot rename to '" + path + "' from");
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

void DraftTree::allocate(int32_t n_nodes, int32_t leaves, int32_t width) {
  n = n_nodes, n_paths = leaves, path_width = width;
  const size_t per_node = size_t(n), n_paths_words = size_t(leaves) * size_t(width);
  const size_t mask_words = (size_t(n) * size_t(n) + 3) / 4;
  buf.reset(new int32_t[6 * per_node + n_paths_words + mask_words]);  // uninitialised
  int32_t* p = buf.get();
  tokens = p, parents = p + per_node, depth = p + 2 * per_node, rank = p + 3 * per_node;
  counts = reinterpret_cast<float*>(p + 4 * per_node);
  bins = p + 5 * per_node;
  std::fill(bins, bins + per_node, -1);
  paths = p + 6 * per_node;
  std::fill(paths, paths + n_paths_words, -1);
  mask = reinterpret_cast<uint8_t*>(paths + n_paths_words);
  std::memset(mask, 0, size_t(n) * size_t(n));
}

// ---------------------------------------------------------------- AcceptanceModel

AcceptanceModel::AcceptanceModel(double prior)
    : prior_(prior), hits_(kBins, 0.0), tries_(kBins, 0.0), q_(kBins, 0.0) {
  if (!(prior > 0.0)) throw std::invalid_argument("acceptance model prior must be positive");
  for (int32_t src = 0; src < kSources; ++src) refresh(src);
}

int32_t AcceptanceModel::bin(int32_t source, int32_t context, double parent_count, double share, bool longest) {
  const int32_t c = context <= 4 ? std::max(context, 1) - 1 : context <= 6 ? 4 : context <= 8 ? 5 : context <= 12 ? 6
                  : context <= 16 ? 7 : context <= 24 ? 8 : 9;
  const int32_t k = parent_count < 1.5 ? 0 : parent_count < 2.5 ? 1 : parent_count < 4.5 ? 2 : parent_count < 8.5 ? 3
                  : parent_count < 16.5 ? 4 : parent_count < 32.5 ? 5 : parent_count < 64.5 ? 6 : 7;
  const int32_t v = std::min(kShares - 1, std::max(0, int32_t(share * kShares)));
  return (((source * kContexts + c) * kCounts + k) * kLongest + int32_t(longest)) * kShares + v;
}

void AcceptanceModel::refresh(int32_t src) {
  // two levels of shrinkage: a bin toward its source's rate at that share (the other features
  // pooled), that toward the share itself; then nondecreasing in the share per row
  constexpr int32_t kRow = kContexts * kCounts * kLongest;
  for (int32_t v = 0; v < kShares; ++v) {
    double h = 0.0, n = 0.0;
    for (int32_t r = 0; r < kRow; ++r) h += hits_[(src * kRow + r) * kShares + v], n += tries_[(src * kRow + r) * kShares + v];
    const double mid = (v + 0.5) / kShares;
    const double m = (h + prior_ * mid) / (n + prior_);
    for (int32_t r = 0; r < kRow; ++r) {
      const int32_t i = (src * kRow + r) * kShares + v;
      q_[i] = (hits_[i] + prior_ * m) / (tries_[i] + prior_);
    }
  }
  for (int32_t r = 0; r < kRow; ++r) {  // isotonic in the share: pool adjacent violators, weights tries + prior
    double value[kShares], weight[kShares];
    int32_t size[kShares], blocks = 0;
    for (int32_t v = 0; v < kShares; ++v) {
      const int32_t i = (src * kRow + r) * kShares + v;
      value[blocks] = q_[i], weight[blocks] = tries_[i] + prior_, size[blocks] = 1;
      for (++blocks; blocks > 1 && value[blocks - 2] > value[blocks - 1]; --blocks) {
        const double w = weight[blocks - 2] + weight[blocks - 1];
        value[blocks - 2] = (value[blocks - 2] * weight[blocks - 2] + value[blocks - 1] * weight[blocks - 1]) / w;
        weight[blocks - 2] = w, size[blocks - 2] += size[blocks - 1];
      }
    }
    for (int32_t k = 0, v = 0; k < blocks; ++k)
      for (int32_t j = 0; j < size[k]; ++j, ++v) q_[(src * kRow + r) * kShares + v] = std::min(1.0, value[k]);
  }
}

void AcceptanceModel::observe(const DraftTree& t, const int32_t* path, int32_t n_path) {
  for (int32_t j = 0; j < n_path; ++j)
    if (path[j] < 0 || path[j] >= t.n) throw std::invalid_argument("accepted path index out of range");
  std::unique_lock<std::shared_mutex> lock(mu_);
  acc_.assign(size_t(t.n), 0);
  for (int32_t j = 0; j < n_path; ++j) acc_[path[j]] = 1;
  uint32_t touched = 0;  // bit per source
  for (int32_t i = 0; i < t.n; ++i) {
    const int32_t b = t.bins[i], p = t.parents[i];
    if (b < 0 || (p >= 0 && !acc_[p])) continue;  // only nodes whose parent was accepted were tried
    tries_[b] += 1.0;
    hits_[b] += acc_[i];
    touched |= 1u << (b / (kBins / kSources));
  }
  for (int32_t src = 0; src < kSources; ++src)
    if (touched >> src & 1u) refresh(src);
}

void AcceptanceModel::set_state(const double* hits, const double* tries) {
  for (int32_t i = 0; i < kBins; ++i)
    if (!(hits[i] >= 0.0 && tries[i] >= hits[i])) throw std::invalid_argument("acceptance model state needs 0 <= hits <= tries");
  std::unique_lock<std::shared_mutex> lock(mu_);
  hits_.assign(hits, hits + kBins);
  tries_.assign(tries, tries + kBins);
  for (int32_t src = 0; src < kSources; ++src) refresh(src);
}

namespace {
using Kid = Pool::Kid;
struct Cand {
  double count;                  // weighted count (sum over pools); calibrated: the path's chance
  double pscore;                 // calibrated: the parent's chance (1 for the context)
  const int32_t* bin;            // calibrated: this candidate's bin in its list (siblings follow)
  int32_t depth, token, parent;  // parent: selection index, -1 for the context
  int32_t left;                  // siblings after this one in its sorted list
  const Kid* kid;                // this candidate in its sorted sibling list
  const int32_t* ids;            // its per-pool node ids [P] (-1: absent in that pool)
};
// Heap entry for a candidate: count desc, then (depth, token, parent) asc packed into one
// integer, a strict total order that makes the draft deterministic under ties. 24 bytes and
// two comparisons instead of a 48-byte Cand and four.
struct HeapItem {
  double count;
  uint64_t tie;  // depth (11 bits) | token (31 bits) | parent + 1 (22 bits)
  int32_t cand;  // index into Scratch::cands
  static uint64_t pack(int32_t depth, int32_t token, int32_t parent) {
    return (uint64_t(depth) << 53) | (uint64_t(token) << 22) | uint64_t(parent + 1);
  }
};
struct Worse {  // a is a worse candidate than b: std heaps keep the best on top
  bool operator()(const HeapItem& a, const HeapItem& b) const {
    return a.count != b.count ? a.count < b.count : a.tie > b.tie;
  }
};
struct Merged {
  double count;  // weighted count; calibrated: q
  int32_t token, pool, node, bin;  // calibrated: bin is set once the token's longest flag is known
  int32_t context;                 // calibrated: the context the parent stands for in this pool
  double share;                    // calibrated: the child's share of the parent's count
};
// Buffers of one draft call, reused so that a warm draft allocates nothing but its result.
struct Scratch {
  std::vector<Cand> sel;           // selected nodes, best-first order
  std::vector<int32_t> sel_ids;    // [len(sel), P] per-pool node ids
  std::vector<Cand> cands;         // every candidate pushed so far
  std::vector<HeapItem> heap;      // binary heap under Worse over cands
  std::vector<Merged> merged;      // P > 1: the pools' children of one node
  std::vector<Kid> small;          // [budget + 1, kSmallFanout] storage for small child lists
  std::vector<std::vector<Kid>> lists;         // P > 1: merged sorted lists (stable buffers)
  std::vector<std::vector<int32_t>> list_ids;  // [len(list), P] for each merged list
  std::vector<std::vector<int32_t>> list_bins; // calibrated: [len(list)] bins for each merged list
  std::vector<int32_t> head, tail, next, dfs_of, order, stack;
  std::vector<uint8_t> is_leaf;
  std::vector<double> chance;     // the cost cut's chances, best-first
  // the draft's entries (pool, weight, source slot, matched node), one per matched suffix
  std::vector<const Pool*> entry_pools;
  std::vector<double> entry_weights;
  std::vector<int32_t> entry_sources, ids;
};
// A Scratch from a free list for the duration of one draft. Not thread_local: in this
// dlopen'ed module every TLS access goes through __tls_get_addr (~5% of a 64-node draft).
std::mutex scratch_mu;
std::vector<std::unique_ptr<Scratch>> scratch_free;
struct ScratchLease {
  std::unique_ptr<Scratch> s;
  ScratchLease() {
    std::lock_guard<std::mutex> g(scratch_mu);
    if (scratch_free.empty()) {
      s = std::make_unique<Scratch>();
    } else {
      s = std::move(scratch_free.back());
      scratch_free.pop_back();
    }
  }
  ~ScratchLease() {
    std::lock_guard<std::mutex> g(scratch_mu);
    scratch_free.push_back(std::move(s));
  }
};
}  // namespace

int32_t best_budget(const double* const* chance, const int32_t* sizes, int rows, const double* cost,
                    int32_t cost_len) {
  int32_t top = 0;
  for (int r = 0; r < rows; ++r) top = std::max(top, sizes[r]);
  top = std::min(top, cost_len - 1);
  // total[b] accumulates each row's 1 + gain in row order; gain grows by one node per b
  std::vector<double> gain(size_t(rows), 1.0);
  double best = -1.0;
  int32_t best_b = 0;
  for (int32_t b = 0; b <= top; ++b) {
    double total = 0.0;
    for (int r = 0; r < rows; ++r) {
      if (b > 0 && b <= sizes[r]) gain[r] += chance[r][b - 1];
      total += gain[r];
    }
    const double score = total / cost[b];
    if (score > best) best = score, best_b = b;
  }
  return best_b;
}

std::vector<int32_t> ragged_budgets(const double* const* chance, const int32_t* sizes, int rows, const double* cost,
                                    int32_t cost_len) {
  // cost of m nodes over the batch: the curve at m / rows nodes per row (linear between points)
  auto cost_at = [&](int64_t m) {
    const double x = std::min(double(m) / rows, double(cost_len - 1));
    const int32_t lo = int32_t(x);
    return lo + 1 < cost_len ? cost[lo] + (x - lo) * (cost[lo + 1] - cost[lo]) : cost[lo];
  };
  // k-way merge of the rows' best-first lists by chance: a row's next node is its next rank, so
  // every prefix of the merge takes a best-first prefix (a subtree) of each row
  std::vector<int32_t> next(size_t(rows), 0), best(size_t(rows), 0);
  double gain = rows, best_score = gain / cost_at(0);
  for (int64_t m = 1;; ++m) {
    int pick = -1;
    for (int r = 0; r < rows; ++r)
      if (next[r] < std::min(sizes[r], cost_len - 1) && (pick < 0 || chance[r][next[r]] > chance[pick][next[pick]]))
        pick = r;
    if (pick < 0) break;
    gain += chance[pick][next[pick]++];
    const double score = gain / cost_at(m);
    if (score > best_score) best_score = score, best = next;
  }
  return best;
}

void chance_by_rank(const DraftTree& t, double* out) {
  for (int32_t i = 0; i < t.n; ++i)
    out[t.rank[i]] = t.root_count > 0.0 ? std::min(1.0, double(t.counts[i]) / t.root_count) : 0.0;
}

DraftTree prefix(const DraftTree& t, int32_t b) {
  std::vector<int32_t> keep, new_of(size_t(t.n), -1);  // kept DFS indices; old index -> new
  for (int32_t i = 0; i < t.n; ++i)
    if (t.rank[i] < b) new_of[i] = int32_t(keep.size()), keep.push_back(i);
  const int32_t n = int32_t(keep.size());
  std::vector<uint8_t> is_leaf(size_t(n), 1);
  for (int32_t i = 0; i < n; ++i)
    if (t.parents[keep[i]] >= 0) is_leaf[new_of[t.parents[keep[i]]]] = 0;
  int32_t leaves = 0, width = 0;
  for (int32_t i = 0; i < n; ++i)
    if (is_leaf[i]) ++leaves, width = std::max(width, t.depth[keep[i]]);
  DraftTree out;
  out.allocate(n, leaves, width);
  out.match_len = t.match_len;
  out.root_count = t.root_count;
  // ranks stay a best-first order (rank < b' is still a subtree): renumber them densely
  std::vector<int32_t> by_rank(keep.size());
  for (int32_t i = 0; i < n; ++i) by_rank[i] = t.rank[keep[i]];
  std::vector<int32_t> order(static_cast<size_t>(n));
  for (int32_t i = 0; i < n; ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](int32_t a, int32_t c) { return by_rank[a] < by_rank[c]; });
  for (int32_t k = 0; k < n; ++k) out.rank[order[k]] = k;
  for (int32_t i = 0; i < n; ++i) {
    const int32_t o = keep[i];
    out.tokens[i] = t.tokens[o];
    out.parents[i] = t.parents[o] < 0 ? -1 : new_of[t.parents[o]];
    out.depth[i] = t.depth[o];
    out.counts[i] = t.counts[o];
    out.bins[i] = t.bins[o];
    uint8_t* row = out.mask + size_t(i) * n;
    if (out.parents[i] >= 0) std::memcpy(row, out.mask + size_t(out.parents[i]) * n, size_t(out.parents[i]) + 1);
    row[i] = 1;
  }
  for (int32_t i = 0, row = 0; i < n; ++i) {
    if (!is_leaf[i]) continue;
    for (int32_t j = i; j >= 0; j = out.parents[j]) out.paths[size_t(row) * width + out.depth[j] - 1] = j;
    ++row;
  }
  return out;
}

DraftTree draft(const Pool* const* pools, const double* weights, int n_pools, const int32_t* ctx, int64_t n_ctx,
                const DraftParams& prm) {
  if (prm.budget < 0 || prm.budget >= (1 << 22) - 1 || prm.max_depth < 1 || prm.min_match < 1 ||
      prm.max_match < prm.min_match)
    throw std::invalid_argument("need 0 <= budget < 2^22 - 1, max_depth >= 1, 1 <= min_match <= max_match");
  if (prm.cost && prm.cost_len < 1) throw std::invalid_argument("cost curve must not be empty");
  if (!(prm.min_chance >= 0.0 && prm.min_chance < 1.0)) throw std::invalid_argument("min_chance must be in [0, 1)");
  if (prm.min_nodes < 0) throw std::invalid_argument("min_nodes must be >= 0");
  if (prm.match_levels < 1) throw std::invalid_argument("match_levels must be >= 1");
  int P = n_pools;
  const AcceptanceModel* cal = prm.acceptance;
  if (prm.sources)
    for (int p = 0; p < P; ++p)
      if (prm.sources[p] < 0 || prm.sources[p] >= AcceptanceModel::kSources)
        throw std::invalid_argument("sources must be in [0, " + std::to_string(AcceptanceModel::kSources) + ")");
  std::shared_lock<std::shared_mutex> cal_lock;
  if (cal) cal_lock = std::shared_lock<std::shared_mutex>(cal->mutex());
  for (int p = 0; p < P; ++p) pools[p]->check_tokens(ctx, n_ctx);
  int32_t budget = prm.budget;
  if (prm.cost) budget = std::min(budget, prm.cost_len - 1);
  // Each distinct pool: shared lock on its trie, and its child cache held for the whole draft
  // (one lock per call instead of one per expanded node), with room for `budget` lists.
  // Taken in address order, one global order, so concurrent drafts over the same pools in
  // different argument orders cannot deadlock; released in reverse on every exit path.
  struct Locks {
    const Pool* small[8];
    std::vector<const Pool*> big;
    const Pool** list = small;
    int n = 0, held = 0;
    ~Locks() {
      for (int i = held - 1; i >= 0; --i) list[i]->cache_mutex().unlock(), list[i]->mutex().unlock_shared();
    }
  } locks;
  if (P > 8) locks.big.resize(P), locks.list = locks.big.data();
  for (int p = 0; p < P; ++p)
    if (std::find(locks.list, locks.list + locks.n, pools[p]) == locks.list + locks.n) locks.list[locks.n++] = pools[p];
  std::sort(locks.list, locks.list + locks.n);
  for (int i = 0; i < locks.n; ++i) {
    locks.list[i]->mutex().lock_shared();
    locks.list[i]->cache_mutex().lock();
    locks.held = i + 1;
    locks.list[i]->reserve_cache(budget + 1);
  }
  // Each pool matches its own longest suffix; the root's count sums the matched nodes. With
  // match_levels m > 1 a pool enters once per matched suffix length, its m longest (an entry
  // = pool, weight, source slot and matched node); from here on `pools`, `weights`, `sources`
  // and P are the entries.
  ScratchLease lease;
  Scratch& S = *lease.s;
  DraftTree t;
  double root_count = 0.0;
  auto& entry_pools = S.entry_pools;
  auto& entry_weights = S.entry_weights;
  auto &entry_sources = S.entry_sources, &ids = S.ids;
  entry_pools.clear(), entry_weights.clear(), entry_sources.clear(), ids.clear();
  for (int p = 0; p < P; ++p) {
    int32_t len = 0;
    const int32_t node = pools[p]->match(ctx, n_ctx, prm.min_match, prm.max_match, &len);
    t.match_len = std::max(t.match_len, len);
    auto enter = [&](int32_t id) {
      entry_pools.push_back(pools[p]), entry_weights.push_back(weights[p]);
      entry_sources.push_back(prm.sources ? prm.sources[p] : 0), ids.push_back(id);
      if (id >= 0) root_count += weights[p] * pools[p]->nodes()[id].count;
    };
    enter(node);
    for (int32_t L = len - 1, more = prm.match_levels - 1; node >= 0 && more > 0 && L >= prm.min_match; --L) {
      int32_t v = 0;
      for (int64_t i = n_ctx - L; i < n_ctx && v >= 0; ++i) v = pools[p]->child(v, ctx[i]);
      if (v >= 0 && pools[p]->nodes()[v].first_child >= 0) enter(v), --more;
    }
  }
  P = int(entry_pools.size());
  pools = entry_pools.data(), weights = entry_weights.data();
  const int32_t* sources = entry_sources.data();
  t.root_count = cal ? 1.0 : root_count;  // calibrated: counts are chances already

  // Best-first growth with lazy siblings: an expanded node's sorted child list stays where
  // it is (the pool's cache for one pool, a merged list for several) and only its best
  // child goes on the heap; popping a child pushes its next sibling. Same selection as
  // pushing every child, in O(budget log budget), and no child list is copied for P == 1.
  auto &sel = S.sel, &cands = S.cands;
  auto& heap = S.heap;
  auto& sel_ids = S.sel_ids;
  sel.clear(), sel_ids.clear(), cands.clear(), heap.clear();
  size_t n_lists = 0, n_expanded = 0;
  S.small.resize(size_t(budget + 1) * Pool::kSmallFanout);
  // kid: the best remaining child in its sorted list (siblings follow it); pscore and bin:
  // calibrated drafts only (the parent's chance, the kid's bin in its list).
  auto push = [&](const Kid* kid, const int32_t* kid_ids, int32_t left, int32_t depth, int32_t parent, double pscore,
                  const int32_t* bin) {
    const double count = cal ? pscore * kid->count : P == 1 ? weights[0] * kid->count : kid->count;
    heap.push_back(HeapItem{count, HeapItem::pack(depth, kid->token, parent), int32_t(cands.size())});
    cands.push_back(Cand{count, pscore, bin, depth, kid->token, parent, left, kid, kid_ids});
    std::push_heap(heap.begin(), heap.end(), Worse{});
  };

  // pscore: the chance of the node being expanded (calibrated drafts; 1 for the context)
  auto expand = [&](const int32_t* pid, int32_t depth, int32_t parent_sel, int32_t room, double pscore) {
    if (depth >= prm.max_depth || room <= 0) return;
    // Storage for this expansion's small list (at most budget + 1 expansions: no realloc).
    Kid* small = S.small.data() + size_t(n_expanded++) * Pool::kSmallFanout;
    if (P == 1 && !cal) {  // the pool's cached list, in place; a Kid's node is its only id
      int32_t len = 0;
      const Kid* kids = pools[0]->best_children(pid[0], room, &len, small);
      if (len > 0) push(kids, &kids->node, len - 1, depth + 1, parent_sel, 0.0, nullptr);
      return;
    }
    // Several pools (or calibrated): each offers its best `room`; equal tokens are summed into
    // one list (calibrated: the best q of the pools, and that pool's bin).
    auto& merged = S.merged;
    merged.clear();
    int32_t longest = 0;  // the longest context with continuations among the entries
    for (int p = 0; p < P; ++p) {
      if (pid[p] < 0) continue;
      int32_t len = 0;
      const Kid* kids = pools[p]->best_children(pid[p], room, &len, small);
      const Node& parent = pools[p]->nodes()[pid[p]];
      if (len > 0) longest = std::max(longest, int32_t(parent.depth));
      for (int32_t j = 0; j < len; ++j)
        merged.push_back(Merged{weights[p] * kids[j].count, kids[j].token, p, kids[j].node, -1, parent.depth,
                                parent.count > 0.0 ? kids[j].count / parent.count : 0.0});
    }
    if (merged.empty()) return;
    std::sort(merged.begin(), merged.end(), [](const Merged& a, const Merged& b) { return a.token < b.token; });
    for (size_t i = 0, j = 0; cal && i < merged.size(); i = j) {  // calibrated: each entry's q, per token run
      bool on_longest = false;
      for (j = i; j < merged.size() && merged[j].token == merged[i].token; ++j)
        on_longest = on_longest || merged[j].context == longest;
      for (size_t k = i; k < j; ++k) {
        const Merged& m = merged[k];
        merged[k].bin = AcceptanceModel::bin(sources[m.pool], m.context, pools[m.pool]->nodes()[pid[m.pool]].count,
                                             m.share, on_longest);
        merged[k].count = cal->q()[merged[k].bin];
      }
    }
    if (n_lists == S.lists.size()) S.lists.emplace_back(), S.list_ids.emplace_back(), S.list_bins.emplace_back();
    std::vector<Kid>& kids = S.lists[n_lists];
    std::vector<int32_t>& kid_ids = S.list_ids[n_lists];
    std::vector<int32_t>& kid_bins = S.list_bins[n_lists];
    ++n_lists;
    kids.clear();  // Kid::node = first index of the token's run in `merged`
    for (size_t i = 0; i < merged.size(); ++i) {
      if (i == 0 || merged[i].token != merged[i - 1].token) kids.push_back(Kid{0.0, merged[i].token, int32_t(i)});
      if (cal) kids.back().count = std::max(kids.back().count, merged[i].count);
      else kids.back().count += merged[i].count;
    }
    auto best_first = [](const Kid& a, const Kid& b) { return a.count != b.count ? a.count > b.count : a.token < b.token; };
    std::sort(kids.begin(), kids.end(), best_first);
    if (int32_t(kids.size()) > room) kids.resize(room);
    kid_ids.assign(kids.size() * P, -1);
    kid_bins.assign(kids.size(), -1);
    for (size_t k = 0; k < kids.size(); ++k)
      for (size_t i = size_t(kids[k].node); i < merged.size() && merged[i].token == kids[k].token; ++i) {
        kid_ids[k * P + merged[i].pool] = merged[i].node;
        if (merged[i].count == kids[k].count && kid_bins[k] < 0) kid_bins[k] = merged[i].bin;  // the best pool's
      }
    push(kids.data(), kid_ids.data(), int32_t(kids.size()) - 1, depth + 1, parent_sel, pscore,
         cal ? kid_bins.data() : nullptr);
  };

  sel.reserve(budget);
  sel_ids.reserve(size_t(budget) * P);
  if (t.match_len > 0) expand(ids.data(), 0, -1, budget, 1.0);
  while (int32_t(sel.size()) < budget && !heap.empty()) {
    // past the floor, stop at the first candidate below min_chance: every other one scores lower
    if (cal && int32_t(sel.size()) >= prm.min_nodes && heap.front().count < prm.min_chance) break;
    std::pop_heap(heap.begin(), heap.end(), Worse{});
    const Cand c = cands[heap.back().cand];
    heap.pop_back();
    const int32_t s = int32_t(sel.size());
    sel.push_back(c);
    if (P == 1) sel_ids.push_back(*c.ids); else sel_ids.insert(sel_ids.end(), c.ids, c.ids + P);
    if (c.left > 0)
      push(c.kid + 1, P == 1 && !cal ? &c.kid[1].node : c.ids + P, c.left - 1, c.depth, c.parent, c.pscore,
           c.bin ? c.bin + 1 : nullptr);
    expand(sel_ids.data() + size_t(s) * P, c.depth, s, budget - s - 1, c.count);
  }

  // Cost-aware cut: keep the best-first prefix maximising (1 + E[accepted]) / cost.
  int32_t n = int32_t(sel.size());
  if (prm.cost && n > 0 && root_count > 0.0) {
    auto& chance = S.chance;
    chance.resize(n);
    for (int32_t i = 0; i < n; ++i) chance[i] = cal ? sel[i].count : std::min(1.0, sel[i].count / root_count);
    const double* rows[1] = {chance.data()};
    n = best_budget(rows, &n, 1, prm.cost, prm.cost_len);
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
  // leaves and the longest path, from the selection (is_leaf by selection index)
  auto& is_leaf = S.is_leaf;
  is_leaf.assign(n, 1);
  int32_t leaves = 0, width = 0;
  for (int32_t s = 0; s < n; ++s)
    if (sel[s].parent >= 0) is_leaf[sel[s].parent] = 0;
  for (int32_t s = 0; s < n; ++s)
    if (is_leaf[s]) ++leaves, width = std::max(width, sel[s].depth);
  t.allocate(n, leaves, width);
  for (int32_t i = 0; i < n; ++i) {
    const Cand& c = sel[order[i]];
    t.tokens[i] = c.token;
    t.parents[i] = c.parent < 0 ? -1 : dfs_of[c.parent];
    t.depth[i] = c.depth;
    t.counts[i] = float(c.count);
    t.bins[i] = c.bin ? *c.bin : -1;
    t.rank[i] = order[i];
    uint8_t* row = t.mask + size_t(i) * n;
    if (t.parents[i] >= 0) std::memcpy(row, t.mask + size_t(t.parents[i]) * n, size_t(t.parents[i]) + 1);
    row[i] = 1;
  }
  for (int32_t i = 0, row = 0; i < n; ++i) {
    if (!is_leaf[order[i]]) continue;
    for (int32_t j = i; j >= 0; j = t.parents[j]) t.paths[size_t(row) * width + t.depth[j] - 1] = j;
    ++row;
  }
  return t;
}

}  // namespace laser
