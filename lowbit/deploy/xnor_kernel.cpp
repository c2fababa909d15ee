// XNOR-popcount convolution on bit-packed signs (Rastegari et al. 2016, sec. 3.2).
//
// A sign is a bit (1 for +1, i.e. x >= 0). Three steps:
//  1. pack_signs: float [N, C, H, W] -> int64 [N, H, W, CW], channel c at bit c % 64 of word c / 64,
//     and in the same pass the channel sum of |x| per pixel, [N, H, W] float.
//  2. im2col: for every output pixel p, its receptive field as one bit row of K = KH*KW*C bits
//     (tap-major, channel-minor: tap t holds bits t*C .. t*C+C-1), stored word-major [KWp][P] so
//     that 8 consecutive pixels are one 512-bit load, and XNOR-Net's K[p] (the tap sum of the
//     channel sums times 1 / (C*KH*KW)). With `with_masks`, also the mask rows (0 on taps outside
//     the image: zero padding contributes 0) and valid[p] = the mask's popcount; they depend only
//     on the geometry, so the caller keeps them.
//  3. popcount_gemm: dot[p, o] = 2 * popcount(~(A[p] ^ W[o]) & M[p]) - valid[p], the identity
//     sum a*w = -n + 2 * popcount(XNOR(a, w)) over the n valid bits; then
//     out[n, o, y, x] = dot * alpha[o] * k[p] + bias[o] in float32 (XNOR-Net's alpha and K).
//     The epilogue can go on with what follows the convolution in the network (popcount_conv):
//     an eval BatchNorm as ATen computes it (fma(y, scale[o], shift[o]), bn_affine), a residual
//     add, and the next binary layer's input: the signs of y - threshold[o] packed as pack_signs
//     packs them, with the channel sums of |y - threshold[o]| in pack_signs' order (channels in
//     order per pixel), so no float activation need be written or read again.
// The float sums of steps 1-2 run in the order of lowbit.quant.binary.xnor_input_scale (channels
// in order, taps row by row, padding adding 0.0f, one multiplication), so K is bit-identical to
// the simulation's; build without -ffast-math.
// Step 3 vectorises across output pixels (one 64-bit lane each), so small inner dimensions
// (144 bits in ResNet-20's first stage) still fill the vector: 4 pixels per AVX2 register, 8 per
// AVX-512 register; popcount by VPOPCNTDQ where the CPU has it, else by the nibble lookup
// (vpshufb) with byte counts summed by vpsadbw. One build holds every path (see supported_paths);
// a scalar popcount loop computes the same integers for the pixels no vector block covers and
// on CPUs without AVX2.
#include <torch/extension.h>
#include <cmath>
#include <cstdint>
#include <vector>
#include <immintrin.h>
#include <string>

// Cloned for AVX2 (4 pixels' words per register) and the baseline, picked at load time. The
// inner loop is branch-free over contiguous pixels of one channel plane so that it vectorises.
// With a threshold [C], the signs and sums are those of x - threshold[c] (RSign), the one float
// subtraction torch's broadcast x - t makes.
__attribute__((target_clones("avx2", "default")))
std::vector<torch::Tensor> pack_signs(torch::Tensor x, c10::optional<torch::Tensor> threshold) {
  x = x.contiguous();
  const float* t = threshold.has_value() ? threshold->data_ptr<float>() : nullptr;
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t CW = (C + 63) / 64, HW = H * W;
  auto out = torch::zeros({N, H, W, CW}, torch::dtype(torch::kInt64));
  auto sums = torch::zeros({N, H, W}, torch::dtype(torch::kFloat32));
  const float* src = x.data_ptr<float>();
  uint64_t* dst = reinterpret_cast<uint64_t*>(out.data_ptr<int64_t>());
  float* mag = sums.data_ptr<float>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) {
      const float* __restrict plane = src + (n * C + c) * HW;
      float* __restrict total = mag + n * HW;
      const int shift = static_cast<int>(c % 64);
      const float tc = t ? t[c] : 0.0f;
      if (CW == 1) {  // every layer up to 64 channels: one word per pixel, contiguous
        uint64_t* __restrict words = dst + n * HW;
        for (int64_t p = 0; p < HW; ++p) {
          const float v = t ? plane[p] - tc : plane[p];
          words[p] |= static_cast<uint64_t>(v >= 0.0f) << shift;
          total[p] += std::fabs(v);
        }
      } else {
        uint64_t* __restrict words = dst + n * HW * CW + c / 64;
        for (int64_t p = 0; p < HW; ++p) {
          const float v = t ? plane[p] - tc : plane[p];
          words[p * CW] |= static_cast<uint64_t>(v >= 0.0f) << shift;
          total[p] += std::fabs(v);
        }
      }
    }
  return {out, sums};
}

static inline void put_bits(uint64_t* row, int64_t offset, uint64_t value, int64_t nbits) {
  const int64_t word = offset / 64, shift = offset % 64;
  row[word] |= value << shift;
  if (shift && shift + nbits > 64) row[word + 1] |= value >> (64 - shift);
}

// The rows alone (the steady state: masks depend only on the geometry, so the caller has them),
// tap by tap over a run of output pixels of one output row: for a fixed tap, consecutive pixels
// read consecutive input words and write consecutive row words (one vector op per 4 or 8 pixels
// at stride 1), and the output row's words stay in L1 across its taps. A pixel's C sign bits
// are clean words (pack_signs sets no bit at or above C), so each tap is OR-ed in at its bit
// offset without masking. Each pixel's K still sums its taps row by row (padding adds nothing),
// as the simulation does, so the vector lanes keep the scalar order.
__attribute__((target_clones("avx512f", "avx2", "default")))
static void im2col_rows(const uint64_t* A, const float* S, uint64_t* R, float* Kp, int64_t N,
                        int64_t H, int64_t W, int64_t CW, int64_t C, int64_t KH, int64_t KW,
                        int64_t stride, int64_t pad, int64_t OH, int64_t OW, int64_t KWp,
                        float scale) {
  const int64_t P = N * OH * OW;
  std::fill(R, R + KWp * P, uint64_t(0));
  std::fill(Kp, Kp + P, S ? 0.0f : 1.0f);  // no sums: a convolution without K (K = 1, exact)
  for (int64_t n = 0; n < N; ++n)
    for (int64_t oy = 0; oy < OH; ++oy) {
      const int64_t p0 = (n * OH + oy) * OW;
      float* __restrict box = Kp + p0;
      for (int64_t ky = 0; ky < KH; ++ky) {
        const int64_t iy = oy * stride + ky - pad;
        if (iy < 0 || iy >= H) continue;  // padding adds 0
        const uint64_t* line = A + (n * H + iy) * W * CW;
        const float* sums = S ? S + (n * H + iy) * W : nullptr;
        for (int64_t kx = 0; kx < KW; ++kx) {
          // the output pixels whose tap kx lands inside the row: 0 <= ox*stride + kx - pad < W
          const int64_t first = std::max<int64_t>(0, (pad - kx + stride - 1) / stride);
          const int64_t reach = W - 1 + pad - kx;  // C++ division truncates: keep it >= 0
          const int64_t last = reach < 0 ? 0 : std::min<int64_t>(OW, reach / stride + 1);
          const int64_t start = first * stride + kx - pad;
          if (!S) {
          } else if (stride == 1) {
            for (int64_t ox = first; ox < last; ++ox) box[ox] += sums[start + ox - first];
          } else {
            for (int64_t ox = first; ox < last; ++ox) box[ox] += sums[start + (ox - first) * stride];
          }
          const int64_t offset = (ky * KW + kx) * C;
          for (int64_t w = 0; w < CW; ++w) {
            const int64_t bit = offset + 64 * w, word = bit / 64, shift = bit % 64;
            const bool spills = shift && shift + std::min<int64_t>(64, C - 64 * w) > 64;
            uint64_t* __restrict lo = R + word * P + p0;
            uint64_t* __restrict hi = R + (word + 1) * P + p0;
            const uint64_t* src = line + start * CW + w;
            if (stride * CW == 1) {  // consecutive pixels read consecutive words: vectorised
              const int64_t n = last - first;
              uint64_t* __restrict to = lo + first;
              for (int64_t i = 0; i < n; ++i) to[i] |= src[i] << shift;
              if (spills) {
                uint64_t* __restrict up = hi + first;
                for (int64_t i = 0; i < n; ++i) up[i] |= src[i] >> (64 - shift);
              }
              continue;
            }
            for (int64_t ox = first; ox < last; ++ox) {
              const uint64_t v = src[(ox - first) * stride * CW];
              lo[ox] |= v << shift;
              if (spills) hi[ox] |= v >> (64 - shift);
            }
          }
        }
      }
      if (S)
        for (int64_t ox = 0; ox < OW; ++ox) box[ox] *= scale;
    }
}

static void border_masks(uint64_t* M, int64_t* V, int64_t N, int64_t H, int64_t W, int64_t C,
                         int64_t KH, int64_t KW, int64_t stride, int64_t pad);

// bits [N, H, W, CW], sums [N, H, W] -> (rows [KWp, P], k [P]) and, with_masks, (masks [KWp, P],
// valid [P] int64); P = N * OH * OW.
std::vector<torch::Tensor> im2col(torch::Tensor bits, torch::Tensor sums, int64_t C, int64_t KH,
                                  int64_t KW, int64_t stride, int64_t pad, bool with_masks) {
  const int64_t N = bits.size(0), H = bits.size(1), W = bits.size(2), CW = bits.size(3);
  const int64_t OH = (H + 2 * pad - KH) / stride + 1, OW = (W + 2 * pad - KW) / stride + 1;
  const int64_t P = N * OH * OW, K = KH * KW * C, KWp = (K + 63) / 64;
  auto rows = torch::empty({KWp, P}, torch::dtype(torch::kInt64));
  auto k = torch::empty({P}, torch::dtype(torch::kFloat32));
  auto masks = torch::empty({with_masks ? KWp : 0, P}, torch::dtype(torch::kInt64));
  auto valid = torch::empty({with_masks ? P : 0}, torch::dtype(torch::kInt64));
  const uint64_t* A = reinterpret_cast<const uint64_t*>(bits.data_ptr<int64_t>());
  const float* S = sums.data_ptr<float>();
  uint64_t* R = reinterpret_cast<uint64_t*>(rows.data_ptr<int64_t>());
  float* Kp = k.data_ptr<float>();
  int64_t* V = valid.data_ptr<int64_t>();
  const float scale = static_cast<float>(1.0 / static_cast<double>(C * KH * KW));
  im2col_rows(A, S, R, Kp, N, H, W, CW, C, KH, KW, stride, pad, OH, OW, KWp, scale);
  if (!with_masks) return {rows, k};
  border_masks(reinterpret_cast<uint64_t*>(masks.data_ptr<int64_t>()), V, N, H, W, C, KH, KW,
               stride, pad);
  return {rows, k, masks, valid};
}

// The mask rows [KWp, P] (0 on taps outside the image) and valid[p], their popcounts.
static void border_masks(uint64_t* M, int64_t* V, int64_t N, int64_t H, int64_t W, int64_t C,
                         int64_t KH, int64_t KW, int64_t stride, int64_t pad) {
  const int64_t OH = (H + 2 * pad - KH) / stride + 1, OW = (W + 2 * pad - KW) / stride + 1;
  const int64_t P = N * OH * OW, KWp = (KH * KW * C + 63) / 64, CW = (C + 63) / 64;
  std::vector<uint64_t> mask(KWp + 1);  // the taps inside the image, and how many bits they hold
  int64_t p = 0;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t oy = 0; oy < OH; ++oy)
      for (int64_t ox = 0; ox < OW; ++ox, ++p) {
        std::fill(mask.begin(), mask.end(), 0);
        int64_t count = 0;
        for (int64_t ky = 0; ky < KH; ++ky) {
          const int64_t iy = oy * stride + ky - pad;
          for (int64_t kx = 0; kx < KW; ++kx) {
            const int64_t ix = ox * stride + kx - pad;
            if (iy < 0 || iy >= H || ix < 0 || ix >= W) continue;
            const int64_t offset = (ky * KW + kx) * C;
            for (int64_t w = 0; w < CW; ++w) {
              const int64_t nbits = std::min<int64_t>(64, C - 64 * w);
              const uint64_t used = nbits == 64 ? ~uint64_t(0) : (uint64_t(1) << nbits) - 1;
              put_bits(mask.data(), offset + 64 * w, used, nbits);
            }
            count += C;
          }
        }
        for (int64_t w = 0; w < KWp; ++w) M[w * P + p] = mask[w];
        V[p] = count;
      }
}

// The popcount GEMM, one function per instruction set, each compiled for its own target
// (__attribute__((target))) in one build and chosen at run time by what the CPU reports
// (supported_paths), so a wheel built on one machine runs its best path on another. Every path
// computes the same integers and the same float epilogue (dot * alpha, then * K, then + bias, no
// FMA contraction), so outputs are bit-identical across paths.
struct Gemm {
  const uint64_t *R, *M, *B;  // rows, masks [KWp, P]; weights [O, KWp]
  const int64_t* V;           // valid bits per pixel [P]
  const float *alpha, *k, *bias;
  // the epilogue's optional steps, in this order (nullptr: absent)
  const float *bn_scale, *bn_shift;  // eval BatchNorm, [O]
  const float* residual;             // added after it, [P / plane, O, plane]
  float* dst;                        // the float output [P / plane, O, plane]
  uint64_t* bits;                    // the next layer's sign words [P, out_words]
  float* magnitude;                  // and its channel sums of |y - threshold| [P]
  const float* threshold;            // the next layer's RSign threshold [O]
  // signs alone, of a convolution without K: bit = dot >= from[o] (up[o]) or dot <= from[o],
  // the exact image of the float epilogue (sign_thresholds); no float is computed
  const int64_t* sign_from;
  const uint8_t* sign_up;
  int64_t KWp, P, O, plane, out_words;
};

static inline bool integer_sign(const Gemm& g, int64_t o, int64_t dot) {
  return g.sign_up[o] ? dot >= g.sign_from[o] : dot <= g.sign_from[o];
}

// Steps after dot * alpha * k + bias, for one output value (the scalar loop and vector tails).
static inline float finish(const Gemm& g, int64_t o, int64_t at, float y) {
  if (g.bn_scale) y = std::fma(y, g.bn_scale[o], g.bn_shift[o]);
  if (g.residual) y = y + g.residual[at];
  if (g.dst) g.dst[at] = y;
  return y;
}

// The scalar loop (the reference, and the tail of every vector path): GCC clones it for CPUs
// with the POPCNT instruction and picks the clone at load time.
__attribute__((target_clones("popcnt", "default"))) static void scalar_pixels(const Gemm& g,
                                                                             int64_t begin,
                                                                             int64_t end) {
  for (int64_t p = begin; p < end; ++p) {
    const int64_t n = p / g.plane, pix = p % g.plane;
    float magnitude = 0.0f;
    uint64_t word = 0;
    for (int64_t o = 0; o < g.O; ++o) {
      int64_t count = 0;
      for (int64_t w = 0; w < g.KWp; ++w)
        count += __builtin_popcountll(~(g.R[w * g.P + p] ^ g.B[o * g.KWp + w]) & g.M[w * g.P + p]);
      if (g.sign_from) {
        word |= static_cast<uint64_t>(integer_sign(g, o, 2 * count - g.V[p])) << (o % 64);
      } else {
        const float dot = static_cast<float>(2 * count - g.V[p]);
        const float y = finish(g, o, (n * g.O + o) * g.plane + pix,
                               dot * g.alpha[o] * g.k[p] + g.bias[o]);
        if (!g.bits) continue;
        const float z = g.threshold ? y - g.threshold[o] : y;
        word |= static_cast<uint64_t>(z >= 0.0f) << (o % 64);
        magnitude += std::fabs(z);
      }
      if (o % 64 == 63 || o == g.O - 1) {
        g.bits[p * g.out_words + o / 64] = word;
        word = 0;
      }
    }
    if (g.magnitude) g.magnitude[p] = magnitude;
  }
}

constexpr int OB = 4;  // output channels per pass over a pixel block's words (kept in L1)

// 4 pixels (one 64-bit lane each) x OB channels. Popcount: the nibble lookup (two vpshufb) into
// byte counts, summed into 64-bit lanes by vpsadbw every 31 words (31 * 8 < 256: no wrap).
__attribute__((target("avx2,fma"))) static void avx2_block(const Gemm& g, int64_t p0) {
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                       0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i low = _mm256_set1_epi8(0x0f), zero = _mm256_setzero_si256();
  const __m256i even = _mm256_setr_epi32(0, 2, 4, 6, 0, 0, 0, 0);
  const int64_t n = p0 / g.plane, pix = p0 % g.plane;
  const __m256i valid = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g.V + p0));
  const __m128 k4 = _mm_loadu_ps(g.k + p0);
  __m256i words = zero;          // the next layer's sign bits, 4 pixels
  __m128 magnitude = _mm_setzero_ps();
  for (int64_t o0 = 0; o0 < g.O; o0 += OB) {
    const int ob = static_cast<int>(std::min<int64_t>(OB, g.O - o0));
    __m256i total[OB], bytes[OB];
    for (int j = 0; j < OB; ++j) total[j] = bytes[j] = zero;
    int pending = 0;
    for (int64_t w = 0; w < g.KWp; ++w) {
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g.R + w * g.P + p0));
      const __m256i m = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g.M + w * g.P + p0));
      for (int j = 0; j < ob; ++j) {
        const __m256i b = _mm256_set1_epi64x(static_cast<int64_t>(g.B[(o0 + j) * g.KWp + w]));
        const __m256i same = _mm256_andnot_si256(_mm256_xor_si256(a, b), m);
        const __m256i lo = _mm256_and_si256(same, low);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(same, 4), low);
        bytes[j] = _mm256_add_epi8(bytes[j], _mm256_add_epi8(_mm256_shuffle_epi8(lut, lo),
                                                             _mm256_shuffle_epi8(lut, hi)));
      }
      if (++pending == 31) {
        for (int j = 0; j < ob; ++j) {
          total[j] = _mm256_add_epi64(total[j], _mm256_sad_epu8(bytes[j], zero));
          bytes[j] = zero;
        }
        pending = 0;
      }
    }
    for (int j = 0; j < ob; ++j) {
      const int64_t o = o0 + j;
      total[j] = _mm256_add_epi64(total[j], _mm256_sad_epu8(bytes[j], zero));
      const __m256i dot = _mm256_sub_epi64(_mm256_add_epi64(total[j], total[j]), valid);
      if (g.sign_from) {
        const __m256i edge = _mm256_set1_epi64x(g.sign_from[o]);
        const __m256i bit = g.sign_up[o] ? _mm256_xor_si256(_mm256_cmpgt_epi64(edge, dot),
                                                            _mm256_set1_epi64x(-1))
                                         : _mm256_xor_si256(_mm256_cmpgt_epi64(dot, edge),
                                                            _mm256_set1_epi64x(-1));
        words = _mm256_or_si256(words, _mm256_and_si256(
                                           bit, _mm256_set1_epi64x(int64_t(1) << (o % 64))));
        if (o % 64 == 63 || o == g.O - 1) {
          alignas(32) uint64_t lanes[4];
          _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), words);
          for (int i = 0; i < 4; ++i) g.bits[(p0 + i) * g.out_words + o / 64] = lanes[i];
          words = zero;
        }
        continue;
      }
      // |dot| <= K < 2^31: the low 32 bits of each lane are the value
      const __m128i dot32 = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(dot, even));
      __m128 y = _mm_mul_ps(_mm_cvtepi32_ps(dot32), _mm_set1_ps(g.alpha[o]));
      y = _mm_add_ps(_mm_mul_ps(y, k4), _mm_set1_ps(g.bias[o]));
      const int64_t at = (n * g.O + o) * g.plane + pix;
      if (g.bn_scale) y = _mm_fmadd_ps(y, _mm_set1_ps(g.bn_scale[o]), _mm_set1_ps(g.bn_shift[o]));
      if (g.residual) y = _mm_add_ps(y, _mm_loadu_ps(g.residual + at));
      if (g.dst) _mm_storeu_ps(g.dst + at, y);
      if (!g.bits) continue;
      const __m128 z = g.threshold ? _mm_sub_ps(y, _mm_set1_ps(g.threshold[o])) : y;
      const __m128 sign = _mm_cmp_ps(z, _mm_setzero_ps(), _CMP_GE_OQ);
      words = _mm256_or_si256(words, _mm256_and_si256(_mm256_cvtepi32_epi64(_mm_castps_si128(sign)),
                                                      _mm256_set1_epi64x(int64_t(1) << (o % 64))));
      magnitude = _mm_add_ps(magnitude, _mm_andnot_ps(_mm_set1_ps(-0.0f), z));
      if (o % 64 == 63 || o == g.O - 1) {
        alignas(32) uint64_t lanes[4];
        _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), words);
        for (int i = 0; i < 4; ++i) g.bits[(p0 + i) * g.out_words + o / 64] = lanes[i];
        words = zero;
      }
    }
  }
  if (g.magnitude) _mm_storeu_ps(g.magnitude + p0, magnitude);
}

// 8 pixels x OB channels in 512-bit lanes; popcount by the AVX-512BW nibble lookup or, with
// VPOPCNTDQ, one instruction per 512 bits. One body for both, as a macro: a target attribute
// cannot depend on a template parameter, and the lookup path must not carry VPOPCNTDQ's target.
#define LOWBIT_AVX512_BODY(POPCOUNT_STEP)                                                         \
  const __m512i lut = _mm512_set4_epi32(0x04030302, 0x03020201, 0x03020201, 0x02010100);        \
  const __m512i low = _mm512_set1_epi8(0x0f), zero = _mm512_setzero_si512();                    \
  const int64_t n = p0 / g.plane, pix = p0 % g.plane;                                          \
  const __m512i valid = _mm512_loadu_si512(g.V + p0);                                          \
  const __m256 k8 = _mm256_loadu_ps(g.k + p0);                                                 \
  __m512i words = zero; /* the next layer's sign bits, 8 pixels */                             \
  __m256 magnitude = _mm256_setzero_ps();                                                      \
  for (int64_t o0 = 0; o0 < g.O; o0 += OB) {                                                   \
    const int ob = static_cast<int>(std::min<int64_t>(OB, g.O - o0));                          \
    __m512i total[OB], bytes[OB];                                                              \
    for (int j = 0; j < OB; ++j) total[j] = bytes[j] = zero;                                   \
    int pending = 0;                                                                           \
    for (int64_t w = 0; w < g.KWp; ++w) {                                                      \
      const __m512i a = _mm512_loadu_si512(g.R + w * g.P + p0);                                \
      const __m512i m = _mm512_loadu_si512(g.M + w * g.P + p0);                                \
      for (int j = 0; j < ob; ++j) {                                                           \
        const __m512i b = _mm512_set1_epi64(static_cast<int64_t>(g.B[(o0 + j) * g.KWp + w]));  \
        const __m512i same = _mm512_andnot_si512(_mm512_xor_si512(a, b), m);                   \
        POPCOUNT_STEP                                                                          \
      }                                                                                        \
      if (++pending == 31) {                                                                   \
        for (int j = 0; j < ob; ++j) {                                                         \
          total[j] = _mm512_add_epi64(total[j], _mm512_sad_epu8(bytes[j], zero));              \
          bytes[j] = zero;                                                                     \
        }                                                                                      \
        pending = 0;                                                                           \
      }                                                                                        \
    }                                                                                          \
    for (int j = 0; j < ob; ++j) {                                                             \
      const int64_t o = o0 + j;                                                                \
      total[j] = _mm512_add_epi64(total[j], _mm512_sad_epu8(bytes[j], zero));                  \
      const __m512i dot = _mm512_sub_epi64(_mm512_add_epi64(total[j], total[j]), valid);       \
      if (g.sign_from) {                                                                       \
        const __m512i edge = _mm512_set1_epi64(g.sign_from[o]);                                \
        const __mmask8 bit = g.sign_up[o] ? _mm512_cmpge_epi64_mask(dot, edge)                 \
                                          : _mm512_cmple_epi64_mask(dot, edge);                \
        words = _mm512_mask_or_epi64(words, bit, words,                                        \
                                     _mm512_set1_epi64(int64_t(1) << (o % 64)));               \
        if (o % 64 == 63 || o == g.O - 1) {                                                    \
          alignas(64) uint64_t lanes[8];                                                       \
          _mm512_store_si512(lanes, words);                                                    \
          for (int i = 0; i < 8; ++i) g.bits[(p0 + i) * g.out_words + o / 64] = lanes[i];      \
          words = zero;                                                                        \
        }                                                                                      \
        continue;                                                                              \
      }                                                                                        \
      __m256 y = _mm256_mul_ps(_mm512_cvtepi64_ps(dot), _mm256_set1_ps(g.alpha[o]));           \
      y = _mm256_add_ps(_mm256_mul_ps(y, k8), _mm256_set1_ps(g.bias[o]));                      \
      const int64_t at = (n * g.O + o) * g.plane + pix;                                        \
      if (g.bn_scale)                                                                          \
        y = _mm256_fmadd_ps(y, _mm256_set1_ps(g.bn_scale[o]), _mm256_set1_ps(g.bn_shift[o]));  \
      if (g.residual) y = _mm256_add_ps(y, _mm256_loadu_ps(g.residual + at));                  \
      if (g.dst) _mm256_storeu_ps(g.dst + at, y);                                              \
      if (!g.bits) continue;                                                                   \
      const __m256 z = g.threshold ? _mm256_sub_ps(y, _mm256_set1_ps(g.threshold[o])) : y;     \
      const __mmask8 sign = _mm256_cmp_ps_mask(z, _mm256_setzero_ps(), _CMP_GE_OQ);            \
      words = _mm512_mask_or_epi64(words, sign, words,                                         \
                                   _mm512_set1_epi64(int64_t(1) << (o % 64)));                 \
      magnitude = _mm256_add_ps(magnitude, _mm256_andnot_ps(_mm256_set1_ps(-0.0f), z));        \
      if (o % 64 == 63 || o == g.O - 1) {                                                      \
        if (g.out_words == 1) {                                                                \
          _mm512_storeu_si512(g.bits + p0, words);                                             \
        } else {                                                                               \
          alignas(64) uint64_t lanes[8];                                                       \
          _mm512_store_si512(lanes, words);                                                    \
          for (int i = 0; i < 8; ++i) g.bits[(p0 + i) * g.out_words + o / 64] = lanes[i];      \
        }                                                                                      \
        words = zero;                                                                          \
      }                                                                                        \
    }                                                                                          \
  }                                                                                            \
  if (g.magnitude) _mm256_storeu_ps(g.magnitude + p0, magnitude);

__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma"))) static void avx512bw_block(const Gemm& g,
                                                                                int64_t p0) {
  LOWBIT_AVX512_BODY(
      const __m512i lo = _mm512_and_si512(same, low);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(same, 4), low);
      bytes[j] = _mm512_add_epi8(bytes[j], _mm512_add_epi8(_mm512_shuffle_epi8(lut, lo),
                                                           _mm512_shuffle_epi8(lut, hi)));)
}

__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vpopcntdq,fma"))) static void
avx512vpopcntdq_block(const Gemm& g, int64_t p0) {
  LOWBIT_AVX512_BODY(total[j] = _mm512_add_epi64(total[j], _mm512_popcnt_epi64(same));)
}
#undef LOWBIT_AVX512_BODY

struct KernelPath {
  const char* name;
  int pixels;                          // pixels per block (0: scalar only)
  void (*block)(const Gemm&, int64_t);
  bool (*supported)();
};

static const KernelPath kPaths[] = {
    {"scalar", 0, nullptr, [] { return true; }},
    {"avx2", 4, avx2_block,
     [] { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }},
    {"avx512bw", 8, avx512bw_block,
     [] {
       return __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
              __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma");
     }},
    {"avx512vpopcntdq", 8, avx512vpopcntdq_block,
     [] {
       return __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
              __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vpopcntdq") &&
              __builtin_cpu_supports("fma");
     }},
};

// The kernel paths this CPU can run, slowest first (the last is the best).
std::vector<std::string> supported_paths() {
  __builtin_cpu_init();
  std::vector<std::string> names;
  for (const auto& path : kPaths)
    if (path.supported()) names.emplace_back(path.name);
  return names;
}

static const KernelPath& kernel_path(const std::string& path) {
  const KernelPath* chosen = nullptr;
  for (const auto& candidate : kPaths)
    if (path == candidate.name) chosen = &candidate;
  TORCH_CHECK(chosen != nullptr && chosen->supported(), "XNOR kernel path '", path,
              "' is not available on this CPU");
  return *chosen;
}

static const float* optional_data(const c10::optional<torch::Tensor>& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

// rows, masks [KWp, P]; weights [O, KWp]; valid [P]; alpha [O]; k [P]; bias [O];
// plane = pixels per image (OH * OW); path: one of supported_paths(). The epilogue: an eval
// BatchNorm (bn_scale, bn_shift [O] from bn_affine), a residual [P / plane, O, plane] added
// after it, then the float output (with_float) and / or the next binary layer's input
// (with_bits: sign words [P, ceil(O / 64)] of y - threshold and their channel sums of |.| [P]).
// Returns {float [P / plane, O, plane] or empty, bits or empty, magnitude or empty}. Blocks
// never cross an image; each image's last pixels go scalar.
std::vector<torch::Tensor> popcount_conv(
    torch::Tensor rows, torch::Tensor masks, torch::Tensor valid, torch::Tensor weights,
    torch::Tensor alpha, torch::Tensor k, torch::Tensor bias, int64_t plane,
    const std::string& path, c10::optional<torch::Tensor> bn_scale,
    c10::optional<torch::Tensor> bn_shift, c10::optional<torch::Tensor> residual,
    bool with_float, c10::optional<torch::Tensor> threshold, bool with_bits,
    bool with_magnitude, c10::optional<torch::Tensor> sign_from,
    c10::optional<torch::Tensor> sign_up) {
  const KernelPath& chosen = kernel_path(path);
  const int64_t KWp = rows.size(0), P = rows.size(1), O = weights.size(0);
  const int64_t out_words = (O + 63) / 64;
  TORCH_CHECK(bn_scale.has_value() == bn_shift.has_value(), "bn_scale and bn_shift go together");
  if (residual.has_value()) {
    TORCH_CHECK(residual->numel() == P * O && residual->scalar_type() == torch::kFloat32,
                "the residual must be float [N, O, OH, OW]");
    residual = residual->contiguous();
  }
  auto out = torch::empty({with_float ? P / plane : 0, O, plane}, torch::dtype(torch::kFloat32));
  auto bits = torch::empty({with_bits ? P : 0, out_words}, torch::dtype(torch::kInt64));
  const bool integer_signs = sign_from.has_value() && with_bits && !with_float &&
                             !with_magnitude && !residual.has_value();
  with_magnitude = with_magnitude && with_bits;
  auto magnitude = torch::empty({with_magnitude ? P : 0}, torch::dtype(torch::kFloat32));
  const Gemm g{reinterpret_cast<const uint64_t*>(rows.data_ptr<int64_t>()),
               reinterpret_cast<const uint64_t*>(masks.data_ptr<int64_t>()),
               reinterpret_cast<const uint64_t*>(weights.data_ptr<int64_t>()),
               valid.data_ptr<int64_t>(), alpha.data_ptr<float>(), k.data_ptr<float>(),
               bias.data_ptr<float>(), optional_data(bn_scale), optional_data(bn_shift),
               optional_data(residual), with_float ? out.data_ptr<float>() : nullptr,
               with_bits ? reinterpret_cast<uint64_t*>(bits.data_ptr<int64_t>()) : nullptr,
               with_magnitude ? magnitude.data_ptr<float>() : nullptr, optional_data(threshold),
               integer_signs ? sign_from->data_ptr<int64_t>() : nullptr,
               integer_signs ? sign_up->data_ptr<uint8_t>() : nullptr, KWp, P, O, plane,
               out_words};
  for (int64_t start = 0; start < P; start += plane) {
    int64_t p = start;
    if (chosen.pixels)
      for (; p + chosen.pixels <= start + plane; p += chosen.pixels) chosen.block(g, p);
    scalar_pixels(g, p, start + plane);
  }
  return {out, bits, magnitude};
}

// The float output alone: [P / plane, O, plane].
torch::Tensor popcount_gemm(torch::Tensor rows, torch::Tensor masks, torch::Tensor valid,
                            torch::Tensor weights, torch::Tensor alpha, torch::Tensor k,
                            torch::Tensor bias, int64_t plane, const std::string& path) {
  return popcount_conv(rows, masks, valid, weights, alpha, k, bias, plane, path, c10::nullopt,
                       c10::nullopt, c10::nullopt, true, c10::nullopt, false, false,
                       c10::nullopt, c10::nullopt)[0];
}

// An eval BatchNorm as y = fma(x, scale, shift), with ATen's CPU kernel's terms (batch_norm_kernel
// .cpp: scale = 1 / sqrt(var + eps) * weight, shift = bias - mean * scale, both contracted to one
// rounding as its vectorised loop is compiled). The caller checks the result against ATen's own
// batch_norm before fusing (another build of ATen may round differently).
std::vector<torch::Tensor> bn_affine(torch::Tensor mean, torch::Tensor var,
                                     c10::optional<torch::Tensor> weight,
                                     c10::optional<torch::Tensor> bias, double eps) {
  mean = mean.contiguous().to(torch::kFloat32);
  var = var.contiguous().to(torch::kFloat32);
  const int64_t C = mean.numel();
  auto scale = torch::empty({C}, torch::dtype(torch::kFloat32));
  auto shift = torch::empty({C}, torch::dtype(torch::kFloat32));
  const float *m = mean.data_ptr<float>(), *v = var.data_ptr<float>();
  const float* w = weight.has_value() ? weight->data_ptr<float>() : nullptr;
  const float* b = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  for (int64_t c = 0; c < C; ++c) {
    const float invstd = 1.0f / std::sqrt(v[c] + static_cast<float>(eps));
    const float a = w ? invstd * w[c] : invstd;
    scale.data_ptr<float>()[c] = a;
    shift.data_ptr<float>()[c] = std::fma(-m[c], a, b ? b[c] : 0.0f);
  }
  return {scale, shift};
}

// x [N, C, ...] -> fma(x, scale[c], shift[c]), element by element (the fused BatchNorm's check).
torch::Tensor affine(torch::Tensor x, torch::Tensor scale, torch::Tensor shift) {
  x = x.contiguous();
  auto out = torch::empty_like(x);
  const int64_t N = x.size(0), C = x.size(1), inner = x.numel() / std::max<int64_t>(1, N * C);
  const float *src = x.data_ptr<float>(), *a = scale.data_ptr<float>(), *b = shift.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  for (int64_t i = 0; i < x.numel(); ++i) {
    const int64_t c = (i / inner) % C;
    dst[i] = std::fma(src[i], a[c], b[c]);
  }
  return out;
}

// One deployed binary convolution: its packed weights and epilogue, the border masks of the
// last input geometry and the im2col scratch, so that a call from Python is one C++ call (at
// batch 1 the per-layer Python work cost as much as the kernel).
class Conv {
 public:
  Conv(torch::Tensor packed, torch::Tensor alpha, torch::Tensor bias,
       c10::optional<torch::Tensor> threshold, int64_t C, int64_t KH, int64_t KW, int64_t stride,
       int64_t pad, c10::optional<torch::Tensor> bn_scale, c10::optional<torch::Tensor> bn_shift,
       c10::optional<torch::Tensor> next_threshold, bool input_scale)
      : packed_(packed.contiguous()), alpha_(alpha.contiguous()), bias_(bias.contiguous()),
        threshold_(threshold), bn_scale_(bn_scale), bn_shift_(bn_shift),
        next_threshold_(next_threshold), C_(C), KH_(KH), KW_(KW), stride_(stride), pad_(pad),
        input_scale_(input_scale) {
    if (!input_scale) sign_thresholds();
  }

  // Without K the epilogue's sign is a function of the integer dot alone, and a monotone one
  // (each float step rounds monotonically): evaluating the scalar epilogue at every dot in
  // [-K, K] gives, per channel, the exact edge where the sign flips, and its direction. A
  // channel that is not monotone (none seen) leaves the float epilogue in charge.
  void sign_thresholds() {
    const int64_t O = packed_.size(0), K = KH_ * KW_ * C_;
    auto from = torch::empty({O}, torch::dtype(torch::kInt64));
    auto up = torch::empty({O}, torch::dtype(torch::kUInt8));
    const float *alpha = alpha_.data_ptr<float>(), *bias = bias_.data_ptr<float>();
    for (int64_t o = 0; o < O; ++o) {
      int flips = 0;
      bool previous = false, first = false;
      int64_t edge = 0;
      for (int64_t d = -K; d <= K; ++d) {
        float y = static_cast<float>(d) * alpha[o] * 1.0f + bias[o];
        if (bn_scale_) y = std::fma(y, bn_scale_->data_ptr<float>()[o],
                                    bn_shift_->data_ptr<float>()[o]);
        const float z = next_threshold_ ? y - next_threshold_->data_ptr<float>()[o] : y;
        const bool bit = z >= 0.0f;
        if (d == -K) first = bit;
        else if (bit != previous) { ++flips; edge = bit ? d : d - 1; }
        previous = bit;
      }
      if (flips > 1) return;  // not a step: keep the float epilogue
      if (flips == 0) {       // constant: every dot gives `first`
        up.data_ptr<uint8_t>()[o] = 1;
        from.data_ptr<int64_t>()[o] = first ? -K - 1 : K + 1;
      } else {
        up.data_ptr<uint8_t>()[o] = first ? 0 : 1;  // 0 -> 1 as dot grows: bit = dot >= edge
        from.data_ptr<int64_t>()[o] = edge;         // else bit = dot <= edge
      }
    }
    sign_from_ = from;
    sign_up_ = up;
  }

  bool integer_signs() const { return sign_from_.has_value(); }

  // Input: a float x [N, C, H, W], or the packed signs (bits, magnitude) of one whose shape is
  // given. Returns {float [N, O, OH, OW] (with_float) or empty, bits [N, OH, OW, ceil(O / 64)]
  // and magnitude [N, OH, OW] (with_bits) or empty}.
  std::vector<torch::Tensor> run(c10::optional<torch::Tensor> x, c10::optional<torch::Tensor> bits,
                                 c10::optional<torch::Tensor> magnitude,
                                 std::vector<int64_t> shape,
                                 c10::optional<torch::Tensor> residual, bool with_float,
                                 bool with_bits, bool with_magnitude, const std::string& path) {
    if (x.has_value()) {
      auto packed = pack_signs(*x, threshold_);
      bits = packed[0];
      magnitude = packed[1];
      shape = x->sizes().vec();
    }
    TORCH_CHECK(shape.size() == 4 && shape[1] == C_, "the binary convolution takes ", C_,
                " input channels");
    const int64_t N = shape[0], H = shape[2], W = shape[3];
    const int64_t OH = (H + 2 * pad_ - KH_) / stride_ + 1, OW = (W + 2 * pad_ - KW_) / stride_ + 1;
    const int64_t P = N * OH * OW, KWp = (KH_ * KW_ * C_ + 63) / 64, O = packed_.size(0);
    if (shape != shape_) {  // a new geometry: its border masks, and scratch of its size
      masks_ = torch::empty({KWp, P}, torch::dtype(torch::kInt64));
      valid_ = torch::empty({P}, torch::dtype(torch::kInt64));
      border_masks(reinterpret_cast<uint64_t*>(masks_.data_ptr<int64_t>()),
                   valid_.data_ptr<int64_t>(), N, H, W, C_, KH_, KW_, stride_, pad_);
      rows_ = torch::empty({KWp, P}, torch::dtype(torch::kInt64));
      k_ = torch::empty({P}, torch::dtype(torch::kFloat32));
      shape_ = shape;
    }
    im2col_rows(reinterpret_cast<const uint64_t*>(bits->data_ptr<int64_t>()),
                input_scale_ ? magnitude->data_ptr<float>() : nullptr,
                reinterpret_cast<uint64_t*>(rows_.data_ptr<int64_t>()),
                k_.data_ptr<float>(), N, H, W, (C_ + 63) / 64, C_, KH_, KW_, stride_, pad_, OH, OW,
                KWp, static_cast<float>(1.0 / static_cast<double>(C_ * KH_ * KW_)));
    auto out = popcount_conv(rows_, masks_, valid_, packed_, alpha_, k_, bias_, OH * OW, path,
                             bn_scale_, bn_shift_, residual, with_float, next_threshold_,
                             with_bits, with_magnitude, sign_from_, sign_up_);
    return {out[0].view({with_float ? N : 0, O, OH, OW}),
            out[1].view({with_bits ? N : 0, OH, OW, (O + 63) / 64}),
            out[2].view({with_bits && with_magnitude ? N : 0, OH, OW})};
  }

 private:
  torch::Tensor packed_, alpha_, bias_;
  c10::optional<torch::Tensor> threshold_, bn_scale_, bn_shift_, next_threshold_;
  int64_t C_, KH_, KW_, stride_, pad_;
  bool input_scale_;
  c10::optional<torch::Tensor> sign_from_, sign_up_;  // sign_thresholds (without K)
  std::vector<int64_t> shape_;
  torch::Tensor masks_, valid_, rows_, k_;
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<Conv>(m, "Conv")
      .def(pybind11::init<torch::Tensor, torch::Tensor, torch::Tensor, c10::optional<torch::Tensor>,
                          int64_t, int64_t, int64_t, int64_t, int64_t,
                          c10::optional<torch::Tensor>, c10::optional<torch::Tensor>,
                          c10::optional<torch::Tensor>, bool>())
      .def("run", &Conv::run)
      .def("integer_signs", &Conv::integer_signs);
  m.def("pack_signs", &pack_signs, pybind11::arg("x"),
        pybind11::arg("threshold") = pybind11::none());
  m.def("im2col", &im2col);
  m.def("popcount_gemm", &popcount_gemm);
  m.def("popcount_conv", &popcount_conv);
  m.def("bn_affine", &bn_affine);
  m.def("affine", &affine);
  m.def("supported_paths", &supported_paths);
}
