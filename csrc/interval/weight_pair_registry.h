// The pairs masked_weight_pair made, remembered so that an op given a weight_pair can tell in
// O(1), without a pass over the weights, that it is masked_weight_pair(weight, mask) of the
// weight and mask it is given, as they are now. The Python layer passes such a cached pair on
// every call (ops/weight_pair.py); anything the registry cannot vouch for is checked by
// recomputing the pair (interval_ops.cpp).
//
// An entry is keyed on the pair's storage and holds weak references to the storages of the
// pair, the weight and the mask, with the version counters, offsets, sizes, strides and dtypes
// they had when the pair was made. Storage and version, not the TensorImpl: the Python cache
// makes the pair from weight.detach(), another TensorImpl over the same storage and version
// counter as the weight the op is then given. Weak references: the registry keeps no tensor
// alive, and while an entry holds one the StorageImpl's memory is not reused, so a live storage
// at the same address is the same storage. Like the Python cache, it sees every write made
// through torch ops, but not one through an alias with its own version counter (`.data`).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Storage.h>
#include <c10/core/TensorImpl.h>
#include <c10/util/Optional.h>
#include <c10/util/intrusive_ptr.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <iterator>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <vector>

namespace robprune {

class WeightPairRegistry {
 public:
  // Remembers that `pair` is masked_weight_pair(weight, mask) of their current contents.
  void record(const at::Tensor& pair, const at::Tensor& weight,
              const c10::optional<at::Tensor>& mask) {
    auto p = Snapshot::of(pair), w = Snapshot::of(weight);
    auto m = mask ? Snapshot::of(*mask) : std::optional<Snapshot>();
    if (!p || !w || (mask && !m)) return;  // no storage or no version counter to follow
    const c10::StorageImpl* key = p->storage._unsafe_get_target();  // before p is moved from
    std::lock_guard<std::mutex> lock(mutex_);
    entries_.insert_or_assign(key, Entry{std::move(*p), std::move(*w), std::move(m)});
    if (entries_.size() >= sweep_at_) sweep();
  }

  // Whether `pair` was recorded for this weight and mask, none of the three written since.
  bool holds(const at::Tensor& pair, const at::Tensor& weight,
             const c10::optional<at::Tensor>& mask) {
    if (!pair.has_storage()) return false;
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = entries_.find(pair.storage().unsafeGetStorageImpl());
    if (it == entries_.end()) return false;
    const Entry& e = it->second;
    if (!e.alive()) {
      entries_.erase(it);
      return false;
    }
    return e.pair.is(pair) && e.weight.is(weight) && e.mask.has_value() == mask.has_value() &&
           (!mask || e.mask->is(*mask));
  }

  std::size_t size() {
    std::lock_guard<std::mutex> lock(mutex_);
    return entries_.size();
  }

 private:
  // What a tensor was when the pair was made.
  struct Snapshot {
    c10::weak_intrusive_ptr<c10::StorageImpl> storage;
    c10::VariableVersion counter;  // shares the tensor's counter: sees writes through its aliases
    uint32_t version;
    int64_t offset;
    std::vector<int64_t> sizes, strides;
    at::ScalarType dtype;

    static std::optional<Snapshot> of(const at::Tensor& t) {
      const c10::VariableVersion& counter = t.unsafeGetTensorImpl()->version_counter();
      if (!t.has_storage() || !counter.enabled()) return std::nullopt;  // e.g. inference tensors
      return Snapshot{t.storage().getWeakStorageImpl(), counter, counter.current_version(),
                      t.storage_offset(), t.sizes().vec(), t.strides().vec(), t.scalar_type()};
    }
    // Not written since, and its storage still alive.
    bool alive() const { return !storage.expired() && counter.current_version() == version; }
    // t is this tensor as it was: same storage and geometry, at the same version.
    bool is(const at::Tensor& t) const {
      const c10::VariableVersion& v = t.unsafeGetTensorImpl()->version_counter();
      return t.has_storage() &&
             t.storage().unsafeGetStorageImpl() == storage._unsafe_get_target() && v.enabled() &&
             v.current_version() == version && t.scalar_type() == dtype &&
             t.storage_offset() == offset && t.sizes() == at::IntArrayRef(sizes) &&
             t.strides() == at::IntArrayRef(strides);
    }
  };

  struct Entry {
    Snapshot pair, weight;
    std::optional<Snapshot> mask;
    // An entry that is not alive can never match again: a version only grows, a storage stays
    // dead.
    bool alive() const { return pair.alive() && weight.alive() && (!mask || mask->alive()); }
  };

  // Drops the entries that can never match again, then waits for the map to double before the
  // next sweep: O(1) amortised per record, and the map stays within twice the live pairs.
  void sweep() {
    for (auto it = entries_.begin(); it != entries_.end();) {
      it = it->second.alive() ? std::next(it) : entries_.erase(it);
    }
    sweep_at_ = std::max(kMinSweep, 2 * entries_.size());
  }

  static constexpr std::size_t kMinSweep = 64;
  std::mutex mutex_;
  std::unordered_map<const c10::StorageImpl*, Entry> entries_;
  std::size_t sweep_at_ = kMinSweep;
};

}  // namespace robprune
