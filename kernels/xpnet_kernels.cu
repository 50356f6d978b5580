// xpnet's CUDA kernels: the math of xpnet/functional.py, by the same names.
//
// Loaded by xpnet/kernels/cuda.py through cupy.RawModule(code, name_expressions=[...]), which
// compiles it with NVRTC on first use (CuPy caches the binary on disk). It includes no CUDA
// toolkit header, which a pip-installed CuPy does not ship: only NVRTC's built-ins are used.
//
// Conventions
// - template<typename T> over float and double; results keep the input dtype (accumulate in T).
// - Indices are 64-bit (index_t), and every loop is grid-stride, so any launch size is correct:
//   the launch configuration only decides speed.
// - Arrays are C-contiguous: the Python side checks it (a raw kernel ignores strides). Outputs
//   may alias inputs of the same shape (out=x): every element is read before it is written, by
//   the same thread, so no pointer here is declared __restrict__ where that is allowed.
// - V is the vector width of a load (16 bytes: 4 floats, 2 doubles) where the Python side saw
//   aligned pointers and a fitting length, else 1.
// - ReLU's derivative at 0 is 0; softmax works from the row maximum (online max and sum in one
//   pass); the loss comes from logits, log(sum(exp(z - m))) + m - z[y], never log(softmax).

typedef long long index_t;

template <typename T> struct Num;
template <> struct Num<float> {
    static __device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }
    static __device__ __forceinline__ float nan() { return __int_as_float(0x7fffffff); }
    static __device__ __forceinline__ float exp(float x) { return expf(x); }
    static __device__ __forceinline__ float log(float x) { return logf(x); }
    static __device__ __forceinline__ float sqrt(float x) { return sqrtf(x); }
};
template <> struct Num<double> {
    static __device__ __forceinline__ double neg_inf() { return __longlong_as_double(0xfff0000000000000ULL); }
    static __device__ __forceinline__ double nan() { return __longlong_as_double(0x7ff8000000000000ULL); }
    static __device__ __forceinline__ double exp(double x) { return ::exp(x); }
    static __device__ __forceinline__ double log(double x) { return ::log(x); }
    static __device__ __forceinline__ double sqrt(double x) { return ::sqrt(x); }
};

// V values of T moved by one 16-byte (or narrower) load or store.
template <typename T, int V> struct alignas(sizeof(T) * V) Vec { T v[V]; };

__device__ __forceinline__ index_t global_thread() {
    return (index_t)blockIdx.x * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ index_t grid_threads() { return (index_t)gridDim.x * blockDim.x; }

// --- elementwise ---------------------------------------------------------------------------

// Each thread issues U independent vector loads before it uses any (memory-level parallelism:
// without it a thread waits out one load's latency per vector), then a grid-stride remainder.
constexpr int U = 4;

// dx = dy where y > 0 else 0, over n elements.
template <typename T, int V>
__global__ void relu_backward(const T* dy, const T* y, T* dx, index_t n) {
    const index_t nv = n / V, stride = grid_threads();
    const Vec<T, V>* dyv = reinterpret_cast<const Vec<T, V>*>(dy);
    const Vec<T, V>* yv = reinterpret_cast<const Vec<T, V>*>(y);
    Vec<T, V>* dxv = reinterpret_cast<Vec<T, V>*>(dx);
    index_t i = global_thread();
    for (; i + (U - 1) * stride < nv; i += U * stride) {
        Vec<T, V> g[U], a[U];
#pragma unroll
        for (int u = 0; u < U; ++u) { g[u] = dyv[i + u * stride]; a[u] = yv[i + u * stride]; }
#pragma unroll
        for (int u = 0; u < U; ++u) {
#pragma unroll
            for (int j = 0; j < V; ++j) g[u].v[j] = a[u].v[j] > T(0) ? g[u].v[j] : T(0);
            dxv[i + u * stride] = g[u];
        }
    }
    for (; i < nv; i += stride) {
        Vec<T, V> g = dyv[i], a = yv[i];
#pragma unroll
        for (int j = 0; j < V; ++j) g.v[j] = a.v[j] > T(0) ? g.v[j] : T(0);
        dxv[i] = g;
    }
    for (index_t t = nv * V + global_thread(); t < n; t += stride) dx[t] = y[t] > T(0) ? dy[t] : T(0);
}

// out = relu(x + b) for x of shape (n / f, f) and b of shape (f,); out may be x (in place).
// V divides f, so a vector never straddles two rows. The column is i % (f / V): in 32 bits where
// the index fits, since a 64-bit division costs several times more.
template <typename T, int V>
__global__ void bias_relu(const T* x, const T* __restrict__ b, T* out, index_t n, index_t f) {
    const index_t nv = n / V, fv = f / V, stride = grid_threads();
    const bool narrow = nv < 0x7fffffff;
    const Vec<T, V>* xv = reinterpret_cast<const Vec<T, V>*>(x);
    const Vec<T, V>* bv = reinterpret_cast<const Vec<T, V>*>(b);
    Vec<T, V>* ov = reinterpret_cast<Vec<T, V>*>(out);
    index_t i = global_thread();
    auto col = [&](index_t k) { return narrow ? (index_t)((unsigned)k % (unsigned)fv) : k % fv; };
    for (; i + (U - 1) * stride < nv; i += U * stride) {
        Vec<T, V> a[U], c[U];
#pragma unroll
        for (int u = 0; u < U; ++u) { a[u] = xv[i + u * stride]; c[u] = bv[col(i + u * stride)]; }
#pragma unroll
        for (int u = 0; u < U; ++u) {
#pragma unroll
            for (int j = 0; j < V; ++j) {
                const T z = a[u].v[j] + c[u].v[j];
                a[u].v[j] = z > T(0) ? z : T(0);
            }
            ov[i + u * stride] = a[u];
        }
    }
    for (; i < nv; i += stride) {
        Vec<T, V> a = xv[i], c = bv[col(i)];
#pragma unroll
        for (int j = 0; j < V; ++j) {
            const T z = a.v[j] + c.v[j];
            a.v[j] = z > T(0) ? z : T(0);
        }
        ov[i] = a;
    }
}

// --- row reductions: online max and sum ----------------------------------------------------
//
// Special values follow the reference (xp.max, then exp(x - max)) exactly: a NaN anywhere makes
// the row's max NaN, so every output of the row is NaN; a +inf max makes the sum NaN (its own
// term is exp(inf - inf)); a row of only -inf has max -inf and NaN outputs; a -inf beside a
// finite max gives exactly 0. The first-max index of a row with a NaN is its first NaN's, as
// numpy.argmax has it, except on the in-register wide path (unspecified there; the loss is NaN).

// a > b in the order of a max that propagates NaN: NaN is above every number.
template <typename T>
__device__ __forceinline__ bool above(T a, T b) {
    return a > b || (a != a && b == b);
}

// The row's sum as the reference has it, from the online max m and sum s: those count a +inf
// maximum's own term as exp(0) = 1 where the reference has exp(inf - inf) = NaN.
template <typename T>
__device__ __forceinline__ T reference_sum(T m, T s) {
    return m == -Num<T>::neg_inf() ? Num<T>::nan() : s;
}

// Fold (m2, s2), a max and a sum of exp(x - m2), into (m, s). Empty parts carry m = -inf, s = 0.
// A NaN m2 takes over (m = NaN, s = NaN); parts whose max is -inf add nothing.
template <typename T>
__device__ __forceinline__ void combine(T& m, T& s, T m2, T s2) {
    if (above(m2, m)) {
        s = s * Num<T>::exp(m - m2) + s2;
        m = m2;
    } else if (m2 > Num<T>::neg_inf()) {
        s += s2 * Num<T>::exp(m2 - m);
    }
}

// As combine, and keep the index of the first maximum (ties go to the smaller index; NaN is the
// maximum, so k is the first NaN's, as numpy.argmax has it).
template <typename T>
__device__ __forceinline__ void combine_arg(T& m, T& s, int& k, T m2, T s2, int k2) {
    const bool tie = m2 == m || (m2 != m2 && m != m);
    if (above(m2, m) || (tie && k2 < k)) k = k2;
    combine(m, s, m2, s2);
}

// Reduce over the G lanes of a group (G a power of two <= 32, groups aligned inside a warp).
// Every lane of the warp must call it.
template <typename T, int G>
__device__ __forceinline__ void group_reduce(T& m, T& s, int& k) {
#pragma unroll
    for (int o = G / 2; o > 0; o /= 2) {
        T m2 = __shfl_xor_sync(0xffffffffu, m, o);
        T s2 = __shfl_xor_sync(0xffffffffu, s, o);
        int k2 = __shfl_xor_sync(0xffffffffu, k, o);
        combine_arg(m, s, k, m2, s2, k2);
    }
}

// Reduce over the whole block (blockDim.x a multiple of 32, at most 1024); all threads get it.
template <typename T>
__device__ __forceinline__ void block_reduce(T& m, T& s, int& k) {
    __shared__ T ms[32], ss[32];
    __shared__ int ks[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    group_reduce<T, 32>(m, s, k);
    __syncthreads();  // the shared slots may still be read from the previous row
    if (lane == 0) { ms[warp] = m; ss[warp] = s; ks[warp] = k; }
    __syncthreads();
    m = lane < warps ? ms[lane] : Num<T>::neg_inf();
    s = lane < warps ? ss[lane] : T(0);
    k = lane < warps ? ks[lane] : 0x7fffffff;
    group_reduce<T, 32>(m, s, k);
}

template <typename T>
__device__ __forceinline__ T block_sum(T v) {
    __shared__ T part[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
#pragma unroll
    for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    v = lane < warps ? part[lane] : T(0);
#pragma unroll
    for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// --- softmax and softmax + cross-entropy ---------------------------------------------------
//
// Rows of `cols` values, three layouts by width:
// - *_narrow (cols <= 16, e.g. 10 classes): a block stages blockDim.x whole rows through shared
//   memory with coalesced loads and stores; each thread then works one row there. (Lanes reading
//   40-byte rows straight from memory would touch each sector many times.)
// - softmax<T, G> / softmax_cross_entropy<T, L, G> (up to 1024): a group of G lanes per row,
//   G = 32 being a warp per row; online max and sum, reduced by shuffles.
// - *_block (wider): a block per row, V-wide loads; a row of up to R * V * blockDim.x values is
//   held in registers and read from memory once, a longer one is read twice (online pass, then
//   the writing pass from the cache).
//
// Cross-entropy, for logits z and integer labels y (type L):
//   grad[r, c] = (exp(z[r, c] - m_r) / s_r - [c == y_r]) * grad_scale
//   *loss_sum += loss_scale * sum_r (m_r + log(s_r) - z[r, y_r])
// With grad_scale = loss_scale = 1/N that is the mean loss and its gradient (xpnet.functional); a
// training loop passes loss_scale = 1 to sum an epoch's losses on the device. `loss_sum` must hold
// 0 (or the running sum) before the launch. `correct`, if not null, gains the number of rows whose
// first maximal logit is at the label (the accuracy, for free). A label outside [0, cols) gives a
// NaN loss and a NaN gradient row: loud, never a silently wrong number. z[r, y_r] is read before
// anything of the row is written, so grad may alias z (in place), as softmax's y may alias x.

constexpr int R = 4;  // vectors per thread a block-per-row kernel keeps in registers (4096 floats)

// What a row operation writes for the value x in column c, given the row's max m and sum s.
template <typename T, bool CE>
struct RowOut {
    T m, inv, grad_scale;
    index_t label;
    bool valid;
    __device__ __forceinline__ RowOut(T m_, T s, T grad_scale_, index_t label_, index_t cols)
        : m(m_), inv(T(1) / s), grad_scale(grad_scale_), label(label_),
          valid(label_ >= 0 && label_ < cols) {}
    __device__ __forceinline__ T operator()(T x, index_t c) const { return from_prob(Num<T>::exp(x - m) * inv, c); }
    // The output for a probability p = exp(x - m) / s computed by the caller.
    __device__ __forceinline__ T from_prob(T p, index_t c) const {
        if (!CE) return p;
        return valid ? (p - (c == label ? T(1) : T(0))) * grad_scale : Num<T>::nan();
    }
    __device__ __forceinline__ T loss(T s, T zy) const {
        return valid ? m + Num<T>::log(s) - zy : Num<T>::nan();
    }
};

template <typename T, typename L>
__device__ __forceinline__ index_t label_of(const L* labels, index_t r) {
    return labels == nullptr ? -1 : (index_t)labels[r];
}

template <typename T>
__device__ __forceinline__ T logit_at(const T* zr, index_t label, index_t cols) {
    return label >= 0 && label < cols ? zr[label] : T(0);
}

// Add the block's loss and hit count to the device totals (one atomic each per block).
template <typename T>
__device__ __forceinline__ void add_totals(T loss, unsigned long long hits, T* loss_sum, T loss_scale,
                                           unsigned long long* correct) {
    loss = block_sum(loss);
    if (correct != nullptr) hits = block_sum(hits);
    if (threadIdx.x == 0) {
        if (loss != T(0)) atomicAdd(loss_sum, loss * loss_scale);
        if (correct != nullptr && hits) atomicAdd(correct, hits);
    }
}

// Copy count values between global and shared memory by the whole block, coalesced.
template <typename T>
__device__ __forceinline__ void copy_tile(T* dst, const T* src, index_t count, bool vectors) {
    index_t done = 0;
    if (vectors) {
        constexpr int V = 16 / sizeof(T);
        const index_t nv = count / V;
        const Vec<T, V>* sv = reinterpret_cast<const Vec<T, V>*>(src);
        Vec<T, V>* dv = reinterpret_cast<Vec<T, V>*>(dst);
        for (index_t i = threadIdx.x; i < nv; i += blockDim.x) dv[i] = sv[i];
        done = nv * V;
    }
    for (index_t i = done + threadIdx.x; i < count; i += blockDim.x) dst[i] = src[i];
}

template <typename T, typename L, bool CE>
__device__ __forceinline__ void rows_narrow(const T* x, const L* labels, T* y, T* loss_sum,
                                            index_t rows, index_t cols, T grad_scale, T loss_scale,
                                            unsigned long long* correct) {
    extern __shared__ __align__(16) unsigned char shared_bytes[];
    T* tile = reinterpret_cast<T*>(shared_bytes);  // blockDim.x rows of cols values
    // 16-byte copies when both ends allow them (a tile starts at a multiple of blockDim.x rows)
    const bool vectors = ((unsigned long long)x % 16 == 0) && ((unsigned long long)y % 16 == 0) &&
                         (blockDim.x * cols * sizeof(T)) % 16 == 0;
    T loss = T(0);
    unsigned long long hits = 0;
    for (index_t r0 = (index_t)blockIdx.x * blockDim.x; r0 < rows; r0 += (index_t)gridDim.x * blockDim.x) {
        const index_t n = rows - r0 < blockDim.x ? rows - r0 : blockDim.x;
        const index_t base = r0 * cols, count = n * cols;
        copy_tile(tile, x + base, count, vectors);
        __syncthreads();
        if (threadIdx.x < n) {
            T* row = tile + threadIdx.x * cols;
            T m = Num<T>::neg_inf(), s = T(0);
            index_t k = 0;
            for (index_t c = 0; c < cols; ++c)
                if (above(row[c], m)) { m = row[c]; k = c; }
            const index_t label = CE ? label_of<T>(labels, r0 + threadIdx.x) : 0;
            const T zy = CE ? logit_at(row, label, cols) : T(0);
            for (index_t c = 0; c < cols; ++c) {  // keep exp(x - m): one exp per value
                const T e = Num<T>::exp(row[c] - m);
                row[c] = e;
                s += e;
            }
            const RowOut<T, CE> out(m, s, grad_scale, label, cols);
            for (index_t c = 0; c < cols; ++c) row[c] = out.from_prob(row[c] * out.inv, c);
            if (CE) {
                loss += out.loss(s, zy);
                hits += out.valid && k == label;
            }
        }
        __syncthreads();
        copy_tile(y + base, tile, count, vectors);
        __syncthreads();
    }
    if (CE) add_totals(loss, hits, loss_sum, loss_scale, correct);
}

template <typename T, typename L, int G, bool CE>
__device__ __forceinline__ void rows_grouped(const T* x, const L* labels, T* y, T* loss_sum,
                                             index_t rows, index_t cols, T grad_scale, T loss_scale,
                                             unsigned long long* correct) {
    const int rows_per_warp = 32 / G;
    const int lane = threadIdx.x % G;
    const index_t warp = global_thread() / 32, warps = grid_threads() / 32;
    T loss = T(0);
    unsigned long long hits = 0;
    for (index_t first = warp * rows_per_warp; first < rows; first += warps * rows_per_warp) {
        const index_t r = first + (threadIdx.x % 32) / G;  // first < rows is warp-uniform
        const bool on = r < rows;
        const T* xr = x + r * cols;
        const index_t label = CE && on ? label_of<T>(labels, r) : 0;
        const T zy = CE && on ? logit_at(xr, label, cols) : T(0);
        T m = Num<T>::neg_inf(), s = T(0);
        int k = 0x7fffffff;
        if (on)
            for (index_t c = lane; c < cols; c += G) combine_arg(m, s, k, xr[c], T(1), (int)c);
        group_reduce<T, G>(m, s, k);  // every lane has passed its reads: writing may begin
        s = reference_sum(m, s);
        if (on) {
            const RowOut<T, CE> out(m, s, grad_scale, label, cols);
            T* yr = y + r * cols;
            for (index_t c = lane; c < cols; c += G) yr[c] = out(xr[c], c);
            if (CE && lane == 0) {
                loss += out.loss(s, zy);
                hits += out.valid && k == label;
            }
        }
    }
    if (CE) add_totals(loss, hits, loss_sum, loss_scale, correct);
}

// The label's logit z[r, y_r] is picked out of the registers by the one thread whose vector holds
// it (no extra load, no load that waits on the label's), and that thread adds the row's loss and
// hit; the gradient's -1 goes to that one element.
template <typename T, typename L, int V, bool CE>
__device__ __forceinline__ void rows_blocked(const T* x, const L* labels, T* y, T* loss_sum,
                                             index_t rows, index_t cols, T grad_scale, T loss_scale,
                                             unsigned long long* correct) {
    const index_t cv = cols / V;
    const bool in_registers = cv <= (index_t)R * blockDim.x;
    // the block's loss and hit count: one thread adds to them per row, between two barriers
    __shared__ T block_loss;
    __shared__ unsigned long long block_hits;
    if (CE && threadIdx.x == 0) { block_loss = T(0); block_hits = 0; }
    for (index_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const Vec<T, V>* xr = reinterpret_cast<const Vec<T, V>*>(x + r * cols);
        Vec<T, V>* yr = reinterpret_cast<Vec<T, V>*>(y + r * cols);
        const index_t label = CE ? label_of<T>(labels, r) : -1;
        const bool valid = CE && label >= 0 && label < cols;
        const index_t lv = valid ? label / V : -1;  // the vector that holds z[r, label]; -1: none
        const int le = valid ? (int)(label % V) : 0;
        T zy = T(0);  // z[r, label], in the thread that holds it (own)
        bool own = false;
        T m = Num<T>::neg_inf(), s = T(0);
        int k = 0x7fffffff;
        Vec<T, V> a[R];
        if (in_registers) {
#pragma unroll
            for (int j = 0; j < R; ++j) {
                const index_t c = threadIdx.x + (index_t)j * blockDim.x;
                if (c < cv) a[j] = xr[c];
            }
#pragma unroll
            for (int j = 0; j < R; ++j) {
                const index_t c = threadIdx.x + (index_t)j * blockDim.x;
#pragma unroll
                for (int e = 0; e < V; ++e)
                    if (c < cv && a[j].v[e] > m) { m = a[j].v[e]; k = (int)(c * V + e); }
                if (CE && c == lv) {
                    own = true;
#pragma unroll
                    for (int e = 0; e < V; ++e)
                        if (e == le) zy = a[j].v[e];
                }
            }
            // keep exp(x - thread max): one exp per value. A share of only -inf values (thread
            // max -inf) keeps exp(-inf - 0) = 0s rather than exp(-inf + inf) = NaN: the rescale
            // below turns them into 0 * exp(-inf - m) / s, which is 0, or NaN where the reference
            // has NaN (the row's max is -inf, +inf or NaN).
            const T base = m == Num<T>::neg_inf() ? T(0) : m;
#pragma unroll
            for (int j = 0; j < R; ++j) {
                const index_t c = threadIdx.x + (index_t)j * blockDim.x;
#pragma unroll
                for (int e = 0; e < V; ++e)
                    if (c < cv) {
                        a[j].v[e] = Num<T>::exp(a[j].v[e] - base);
                        s += a[j].v[e];
                    }
            }
            // A NaN in the share (dropped by > above, which keeps registers free: a check there
            // spills) or a +inf max makes s NaN; the reference's row is then all NaN: say so
            // with a NaN max, which block_reduce spreads.
            if (s != s) m = s;
        } else {
            for (index_t c = threadIdx.x; c < cv; c += blockDim.x) {
                const Vec<T, V> b = xr[c];
                if (CE && c == lv) {
                    own = true;
#pragma unroll
                    for (int e = 0; e < V; ++e)
                        if (e == le) zy = b.v[e];
                }
#pragma unroll
                for (int e = 0; e < V; ++e) combine_arg(m, s, k, b.v[e], T(1), (int)(c * V + e));
            }
        }
        const T thread_max = m;
        block_reduce(m, s, k);  // all reads of the row happen before this barrier
        s = reference_sum(m, s);
        const T inv = T(1) / s;
        // softmax: p; cross-entropy: (p - [column == label]) * grad_scale, NaN for a bad label
        const T gs = valid ? grad_scale : Num<T>::nan();
        auto out = [&](T p, bool at_label) -> T {
            if (!CE) return p;
            return (at_label ? p - T(1) : p) * gs;
        };
        if (in_registers) {
            // a holds exp(x - thread_max) (0s for a share of -inf); rescale to exp(x - m) / s
            const T scale = Num<T>::exp(thread_max - m) * inv;
#pragma unroll
            for (int j = 0; j < R; ++j) {
                const index_t c = threadIdx.x + (index_t)j * blockDim.x;
                if (c < cv) {
                    const bool here = CE && c == lv;
#pragma unroll
                    for (int e = 0; e < V; ++e) a[j].v[e] = out(a[j].v[e] * scale, here && e == le);
                    yr[c] = a[j];
                }
            }
        } else {
            for (index_t c = threadIdx.x; c < cv; c += blockDim.x) {
                Vec<T, V> b = xr[c];
                const bool here = CE && c == lv;
#pragma unroll
                for (int e = 0; e < V; ++e) b.v[e] = out(Num<T>::exp(b.v[e] - m) * inv, here && e == le);
                yr[c] = b;
            }
        }
        if (CE) {
            if (own) {
                block_loss += m + Num<T>::log(s) - zy;
                block_hits += k == label;
            } else if (!valid && threadIdx.x == 0) {
                block_loss += Num<T>::nan();
            }
        }
        __syncthreads();  // a streamed row is re-read above: finish it before the next row's writes
    }
    if (CE && threadIdx.x == 0) {  // after the last row's barrier: one atomic each per block
        if (block_loss != T(0)) atomicAdd(loss_sum, block_loss * loss_scale);
        if (correct != nullptr && block_hits) atomicAdd(correct, block_hits);
    }
}

template <typename T>
__global__ void softmax_narrow(const T* x, T* y, index_t rows, index_t cols) {
    rows_narrow<T, int, false>(x, nullptr, y, nullptr, rows, cols, T(0), T(0), nullptr);
}
template <typename T, int G>
__global__ void softmax(const T* x, T* y, index_t rows, index_t cols) {
    rows_grouped<T, int, G, false>(x, nullptr, y, nullptr, rows, cols, T(0), T(0), nullptr);
}
template <typename T, int V>
__global__ void softmax_block(const T* x, T* y, index_t rows, index_t cols) {
    rows_blocked<T, int, V, false>(x, nullptr, y, nullptr, rows, cols, T(0), T(0), nullptr);
}

template <typename T, typename L>
__global__ void softmax_cross_entropy_narrow(const T* z, const L* labels, T* grad, T* loss_sum,
                                             index_t rows, index_t cols, T grad_scale, T loss_scale,
                                             unsigned long long* correct) {
    rows_narrow<T, L, true>(z, labels, grad, loss_sum, rows, cols, grad_scale, loss_scale, correct);
}
template <typename T, typename L, int G>
__global__ void softmax_cross_entropy(const T* z, const L* labels, T* grad, T* loss_sum, index_t rows,
                                      index_t cols, T grad_scale, T loss_scale,
                                      unsigned long long* correct) {
    rows_grouped<T, L, G, true>(z, labels, grad, loss_sum, rows, cols, grad_scale, loss_scale, correct);
}
// Blocks of THREADS = 256 per SM (cuda.py launches 256 threads) the kernel below is compiled to
// fit, which caps its registers at 65536 / (256 * blocks). float32: 6 blocks, 40 registers; measured
// on an H100 (bench/cuda_softmax_ce_check.py, float32, 4096 columns, 10 launches back to back): 55
// registers (4 blocks) 84% of copy, 48 (5 blocks) 80%, 40 (6 blocks, a few bytes spilled) 91%.
// float64 holds twice the bytes per value: at 40 registers it spilled 104-184 bytes, so 4 blocks
// (64 registers, no spill; not yet timed on a GPU). An sm_75 SM takes at most 1024 threads, 4
// blocks: 6 is out of range there (a ptxas warning, an error under -Werror).
template <typename T> struct WideBlocks { static constexpr int value = 4; };
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ != 750
template <> struct WideBlocks<float> { static constexpr int value = 6; };
#endif

template <typename T, typename L, int V>
__global__ void __launch_bounds__(256, WideBlocks<T>::value)
softmax_cross_entropy_block(const T* z, const L* labels, T* grad, T* loss_sum, index_t rows, index_t cols,
                            T grad_scale, T loss_scale, unsigned long long* correct) {
    rows_blocked<T, L, V, true>(z, labels, grad, loss_sum, rows, cols, grad_scale, loss_scale, correct);
}

// --- training on the device (xpnet/kernels/cuda_graph.py) -----------------------------------
//
// A step of a ReLU MLP is: gather a batch; per layer a GEMM with the bias (and ReLU) fused in;
// softmax + cross-entropy; per layer a GEMM for the weight gradient with the bias gradient as an
// extra output row, and a GEMM for the input gradient with the ReLU mask fused in; one update
// of all parameters. Only these kernels (no cuBLAS), so the whole step can be captured in a CUDA
// graph. Step counters live on the device; each has one writer kernel, which no other block
// of that kernel reads:
//   counters[0]: the step within the epoch, read by gather_rows, advanced by the update kernel;
//   counters[1]: the update count t (Adam's bias correction), advanced by gather_rows, read by
//                the update kernel.

// batch_x[i, :] = x[perm[counters[0] * batch + i], :] and the same for the labels.
template <typename T, typename L>
__global__ void gather_rows(const T* __restrict__ x, const L* __restrict__ labels,
                            const index_t* __restrict__ perm, long long* counters,
                            T* __restrict__ batch_x, L* __restrict__ batch_labels, index_t batch,
                            index_t cols, index_t full_batch) {
    const index_t base = counters[0] * full_batch;
    for (index_t i = global_thread(); i < batch * cols; i += grid_threads()) {
        const index_t r = i / cols, c = i - r * cols;
        batch_x[i] = x[perm[base + r] * cols + c];
    }
    for (index_t i = global_thread(); i < batch; i += grid_threads()) batch_labels[i] = labels[perm[base + i]];
    if (global_thread() == 0) counters[1] += 1;
}

// C = A @ B over a 32 x 32 tile per block of 256 threads, each thread 2 x 2 outputs.
//   A(m, k) = TA ? A[k * lda + m] : A[m * lda + k]        (M x K)
//   B(k, n) = TB ? B[n * ldb + k] : B[k * ldb + n]        (K x N)
// Epilogues: EPI 0 plain; 1 + bias[n]; 2 relu(+ bias[n]); 3 zero where aux[m, n] <= 0 (the ReLU
// mask of a backward pass, aux laid out like C). BIAS_ROW appends a row of ones to A, so that row
// M of the product is the column sum of B; it is written to aux[n] (the bias gradient, fused into
// the weight-gradient GEMM). Grid: (ceil(N / 32), ceil((M + BIAS_ROW) / 32), S). Sizes here are
// small (a batch of 128 against layers of up to a few hundred): latency, not FLOPs, matters.
// Split K: block z sums k in [z * kc, (z + 1) * kc) into slice z of C, an (S, M, ldc) array of
// partial sums that sum_splits adds up; with S = 1 (and kc >= K) it is the whole product. A
// product with few output tiles and a long K (x @ W1 at batch 128: 8 tiles, K = 784) otherwise
// runs on a few SMs, one long loop each. Only EPI 0 without BIAS_ROW is launched with S > 1.
template <typename T, bool TA, bool TB, int EPI, bool BIAS_ROW>
__global__ void __launch_bounds__(256)
gemm(const T* __restrict__ A, const T* __restrict__ B, T* __restrict__ C, T* aux, int M, int N, int K,
     int lda, int ldb, int ldc, int kc) {
    __shared__ T As[32][33];  // As[k][m]; the pad keeps transposed stores free of bank conflicts
    __shared__ T Bs[32][33];  // Bs[k][n]
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const int m0 = blockIdx.y * 32, n0 = blockIdx.x * 32;
    const int rows_a = M + (BIAS_ROW ? 1 : 0);
    const int k_lo = blockIdx.z * kc, k_hi = min(K, k_lo + kc);
    C += (index_t)blockIdx.z * M * ldc;
    T acc[2][2] = {{T(0), T(0)}, {T(0), T(0)}};
    T ra[4], rb[4];

    // Each thread moves 4 of the 32 x 32 values of each tile; the fast index follows memory.
    auto load = [&](int k0) {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const int i = tid + q * 256, fast = i % 32, slow = i / 32;
            const int am = TA ? fast : slow, ak = TA ? slow : fast;
            const int m = m0 + am, k = k0 + ak;
            T a = T(0);
            if (k < k_hi) {
                if (m < M) a = TA ? A[(index_t)k * lda + m] : A[(index_t)m * lda + k];
                else if (BIAS_ROW && m == M) a = T(1);
            }
            ra[q] = a;
            const int bn = TB ? slow : fast, bk = TB ? fast : slow;
            const int n = n0 + bn, kb = k0 + bk;
            rb[q] = (kb < k_hi && n < N) ? (TB ? B[(index_t)n * ldb + kb] : B[(index_t)kb * ldb + n]) : T(0);
        }
    };
    auto store = [&]() {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const int i = tid + q * 256, fast = i % 32, slow = i / 32;
            if (TA) As[slow][fast] = ra[q]; else As[fast][slow] = ra[q];
            if (TB) Bs[fast][slow] = rb[q]; else Bs[slow][fast] = rb[q];
        }
    };

    load(k_lo);
    store();
    __syncthreads();
    for (int k0 = k_lo; k0 < k_hi; k0 += 32) {
        const bool more = k0 + 32 < k_hi;
        if (more) load(k0 + 32);  // the next tile's loads fly while this one is multiplied
#pragma unroll
        for (int k = 0; k < 32; ++k) {
            const T a0 = As[k][ty], a1 = As[k][ty + 16], b0 = Bs[k][tx], b1 = Bs[k][tx + 16];
            acc[0][0] += a0 * b0;
            acc[0][1] += a0 * b1;
            acc[1][0] += a1 * b0;
            acc[1][1] += a1 * b1;
        }
        __syncthreads();
        if (more) {
            store();
            __syncthreads();
        }
    }

#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int m = m0 + ty + 16 * i;
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int n = n0 + tx + 16 * j;
            if (n >= N || m >= rows_a) continue;
            T v = acc[i][j];
            if (BIAS_ROW && m == M) { aux[n] = v; continue; }
            if (EPI == 1 || EPI == 2) v += aux[n];
            if (EPI == 2) v = v > T(0) ? v : T(0);
            if (EPI == 3) v = aux[(index_t)m * ldc + n] > T(0) ? v : T(0);
            C[(index_t)m * ldc + n] = v;
        }
    }
}

// C[m, n] = epilogue(sum over z of P[z, m, n]): the split-K partial sums of gemm added up, in
// order of z, then the bias (EPI 1) and ReLU (EPI 2) as gemm's epilogues apply them. C is
// M x N, row-major and contiguous; P is S such arrays one after another.
template <typename T, int EPI>
__global__ void sum_splits(const T* __restrict__ P, T* __restrict__ C, const T* __restrict__ bias, int M,
                           int N, int S) {
    const index_t size = (index_t)M * N;
    for (index_t i = global_thread(); i < size; i += grid_threads()) {
        T v = P[i];
        for (int z = 1; z < S; ++z) v += P[z * size + i];
        if (EPI == 1 || EPI == 2) v += bias[i % N];
        if (EPI == 2) v = v > T(0) ? v : T(0);
        C[i] = v;
    }
}

// One update of every parameter, all tensors in one launch (xpnet/optim.py's math). Parameter j
// has offsets[j+1] - offsets[j] values at address params[j]; its gradient and optimizer state are
// the same slice of the flat buffers grads, state1 (momentum, or Adam's m) and state2 (Adam's v).
// hyper = {lr, momentum, weight_decay, beta1, beta2, eps, nesterov} lives in device memory, so a
// learning-rate schedule needs no new graph. The L2 penalty is coupled (g += weight_decay * p).
// ADAM 0 is SGD: v = momentum v + g; p -= lr * (nesterov ? g + momentum v : v) (plain g when
// momentum is 0). ADAM 1 is Adam: p -= lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps), t the
// update count.
template <typename T, int ADAM>
__global__ void update_parameters(const unsigned long long* __restrict__ params,
                                  const index_t* __restrict__ offsets, int tensors,
                                  const T* __restrict__ grads, T* __restrict__ state1,
                                  T* __restrict__ state2, const double* __restrict__ hyper,
                                  long long* counters) {
    const index_t total = offsets[tensors];
    const T lr = T(hyper[0]), momentum = T(hyper[1]), wd = T(hyper[2]);
    const T beta1 = T(hyper[3]), beta2 = T(hyper[4]), eps = T(hyper[5]);
    // 1 - beta in double, then rounded, as xpnet.optim passes it: T(1) - T(beta) differs (float32,
    // beta2 = 0.999: by 1.3e-5 relative)
    const T one_minus_beta1 = T(1.0 - hyper[3]), one_minus_beta2 = T(1.0 - hyper[4]);
    const bool nesterov = hyper[6] != 0.0;
    T step = lr, c2 = T(1);
    if (ADAM) {  // the corrections in double, as xpnet.optim.Adam computes them on the host
        const double t = (double)counters[1];
        step = T(hyper[0] / (1.0 - ::pow(hyper[3], t)));
        c2 = T(1.0 - ::pow(hyper[4], t));
    }
    int j = 0;
    for (index_t i = global_thread(); i < total; i += grid_threads()) {
        while (i >= offsets[j + 1]) ++j;  // i only grows, so j only moves forward
        T* p = reinterpret_cast<T*>(params[j]) + (i - offsets[j]);
        const T g = grads[i] + wd * *p;
        if (ADAM) {
            const T m = beta1 * state1[i] + one_minus_beta1 * g;
            const T v = beta2 * state2[i] + one_minus_beta2 * (g * g);
            state1[i] = m;
            state2[i] = v;
            *p -= step * m / (Num<T>::sqrt(v / c2) + eps);
        } else if (momentum != T(0)) {
            const T v = momentum * state1[i] + g;
            state1[i] = v;
            *p -= lr * (nesterov ? g + momentum * v : v);
        } else {
            *p -= lr * g;
        }
    }
    if (global_thread() == 0) counters[0] += 1;
}
