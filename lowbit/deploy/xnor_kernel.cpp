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
// The float sums of steps 1-2 run in the order of lowbit.quant.binary.xnor_input_scale (channels
// in order, taps row by row, padding adding 0.0f, one multiplication), so K is bit-identical to
// the simulation's; build without -ffast-math.
// Step 3 vectorises across 8 output pixels (one 64-bit lane each), so small inner dimensions
// (144 bits in ResNet-20's first stage) still fill the vector: popcount by VPOPCNTDQ where the
// CPU has it, else by the nibble lookup (vpshufb) of AVX-512BW with byte counts summed by
// vpsadbw. Without AVX-512BW, or for the
// last pixels, a scalar popcount loop computes the same integers.
#include <torch/extension.h>
#include <cmath>
#include <cstdint>
#include <vector>
#if defined(__AVX512BW__) && defined(__AVX512DQ__)
#include <immintrin.h>
#define LOWBIT_AVX512 1
#endif

std::vector<torch::Tensor> pack_signs(torch::Tensor x) {
  x = x.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t CW = (C + 63) / 64, HW = H * W;
  auto out = torch::zeros({N, H, W, CW}, torch::dtype(torch::kInt64));
  auto sums = torch::zeros({N, H, W}, torch::dtype(torch::kFloat32));
  const float* src = x.data_ptr<float>();
  uint64_t* dst = reinterpret_cast<uint64_t*>(out.data_ptr<int64_t>());
  float* mag = sums.data_ptr<float>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) {
      const float* plane = src + (n * C + c) * HW;
      uint64_t* words = dst + n * HW * CW + c / 64;
      float* total = mag + n * HW;
      const uint64_t bit = uint64_t(1) << (c % 64);
      for (int64_t p = 0; p < HW; ++p) {
        if (plane[p] >= 0.0f) words[p * CW] |= bit;
        total[p] += std::fabs(plane[p]);
      }
    }
  return {out, sums};
}

static inline void put_bits(uint64_t* row, int64_t offset, uint64_t value, int64_t nbits) {
  const int64_t word = offset / 64, shift = offset % 64;
  row[word] |= value << shift;
  if (shift && shift + nbits > 64) row[word + 1] |= value >> (64 - shift);
}

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
  uint64_t* M = reinterpret_cast<uint64_t*>(masks.data_ptr<int64_t>());
  float* Kp = k.data_ptr<float>();
  int64_t* V = valid.data_ptr<int64_t>();
  const float scale = static_cast<float>(1.0 / static_cast<double>(C * KH * KW));
  std::vector<uint64_t> row(KWp + 1), mask(KWp + 1);
  int64_t p = 0;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t oy = 0; oy < OH; ++oy)
      for (int64_t ox = 0; ox < OW; ++ox, ++p) {
        std::fill(row.begin(), row.end(), 0);
        std::fill(mask.begin(), mask.end(), 0);
        int64_t count = 0;
        float box = 0.0f;
        for (int64_t ky = 0; ky < KH; ++ky) {
          const int64_t iy = oy * stride + ky - pad;
          for (int64_t kx = 0; kx < KW; ++kx) {
            const int64_t ix = ox * stride + kx - pad;
            if (iy < 0 || iy >= H || ix < 0 || ix >= W) continue;  // padding adds 0
            box += S[(n * H + iy) * W + ix];
            const int64_t offset = (ky * KW + kx) * C;
            const uint64_t* src = A + ((n * H + iy) * W + ix) * CW;
            for (int64_t w = 0; w < CW; ++w) {
              const int64_t nbits = std::min<int64_t>(64, C - 64 * w);
              const uint64_t used = nbits == 64 ? ~uint64_t(0) : (uint64_t(1) << nbits) - 1;
              put_bits(row.data(), offset + 64 * w, src[w] & used, nbits);
              if (with_masks) put_bits(mask.data(), offset + 64 * w, used, nbits);
            }
            count += C;
          }
        }
        Kp[p] = box * scale;
        for (int64_t w = 0; w < KWp; ++w) R[w * P + p] = row[w];
        if (with_masks) {
          for (int64_t w = 0; w < KWp; ++w) M[w * P + p] = mask[w];
          V[p] = count;
        }
      }
  if (with_masks) return {rows, k, masks, valid};
  return {rows, k};
}

// rows, masks [KWp, P]; weights [O, KWp]; valid [P]; alpha [O]; k [P]; bias [O];
// plane = pixels per image (OH * OW). Returns float [P / plane, O, plane].
torch::Tensor popcount_gemm(torch::Tensor rows, torch::Tensor masks, torch::Tensor valid,
                            torch::Tensor weights, torch::Tensor alpha, torch::Tensor k,
                            torch::Tensor bias, int64_t plane) {
  const int64_t KWp = rows.size(0), P = rows.size(1), O = weights.size(0);
  auto out = torch::empty({P / plane, O, plane}, torch::dtype(torch::kFloat32));
  const uint64_t* R = reinterpret_cast<const uint64_t*>(rows.data_ptr<int64_t>());
  const uint64_t* M = reinterpret_cast<const uint64_t*>(masks.data_ptr<int64_t>());
  const uint64_t* B = reinterpret_cast<const uint64_t*>(weights.data_ptr<int64_t>());
  const int64_t* V = valid.data_ptr<int64_t>();
  const float* al = alpha.data_ptr<float>();
  const float* kk = k.data_ptr<float>();
  const float* bi = bias.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  int64_t p0 = 0;
#ifdef LOWBIT_AVX512
  // 4 output channels per pass over the rows: each 8-pixel word is loaded once for all 4.
  constexpr int OB = 4;
  const __m512i lut = _mm512_set4_epi32(0x04030302, 0x03020201, 0x03020201, 0x02010100);
  const __m512i low = _mm512_set1_epi8(0x0f);
  const __m512i zero = _mm512_setzero_si512();
  for (; p0 + 8 <= P && (p0 % plane) + 8 <= plane; p0 += 8) {
    const int64_t n = p0 / plane, pix = p0 % plane;
    const __m512i valid8 = _mm512_loadu_si512(V + p0);
    const __m256 k8 = _mm256_loadu_ps(kk + p0);
    for (int64_t o0 = 0; o0 < O; o0 += OB) {
      const int ob = static_cast<int>(std::min<int64_t>(OB, O - o0));
      __m512i total[OB], bytes[OB];
      for (int j = 0; j < OB; ++j) total[j] = bytes[j] = zero;
      int pending = 0;
      for (int64_t w = 0; w < KWp; ++w) {
        const __m512i a = _mm512_loadu_si512(R + w * P + p0);
        const __m512i m = _mm512_loadu_si512(M + w * P + p0);
        for (int j = 0; j < ob; ++j) {
          const __m512i b = _mm512_set1_epi64(static_cast<int64_t>(B[(o0 + j) * KWp + w]));
          const __m512i same = _mm512_andnot_si512(_mm512_xor_si512(a, b), m);
#ifdef __AVX512VPOPCNTDQ__  // one instruction per 512 bits where the CPU has it
          total[j] = _mm512_add_epi64(total[j], _mm512_popcnt_epi64(same));
#else
          const __m512i lo = _mm512_and_si512(same, low);
          const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(same, 4), low);
          bytes[j] = _mm512_add_epi8(bytes[j], _mm512_add_epi8(_mm512_shuffle_epi8(lut, lo),
                                                               _mm512_shuffle_epi8(lut, hi)));
#endif
        }
        if (++pending == 31) {  // 31 * 8 < 256: sum the byte counts before they wrap
          for (int j = 0; j < ob; ++j) {
            total[j] = _mm512_add_epi64(total[j], _mm512_sad_epu8(bytes[j], zero));
            bytes[j] = zero;
          }
          pending = 0;
        }
      }
      for (int j = 0; j < ob; ++j) {
        const int64_t o = o0 + j;
        total[j] = _mm512_add_epi64(total[j], _mm512_sad_epu8(bytes[j], zero));
        const __m512i dot = _mm512_sub_epi64(_mm512_add_epi64(total[j], total[j]), valid8);
        __m256 y = _mm256_mul_ps(_mm512_cvtepi64_ps(dot), _mm256_set1_ps(al[o]));
        y = _mm256_add_ps(_mm256_mul_ps(y, k8), _mm256_set1_ps(bi[o]));
        _mm256_storeu_ps(dst + (n * O + o) * plane + pix, y);
      }
    }
  }
#endif
  for (int64_t p = p0; p < P; ++p) {
    const int64_t n = p / plane, pix = p % plane;
    for (int64_t o = 0; o < O; ++o) {
      int64_t count = 0;
      for (int64_t w = 0; w < KWp; ++w)
        count += __builtin_popcountll(~(R[w * P + p] ^ B[o * KWp + w]) & M[w * P + p]);
      const float dot = static_cast<float>(2 * count - V[p]);
      dst[(n * O + o) * plane + pix] = dot * al[o] * kk[p] + bi[o];
    }
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack_signs", &pack_signs);
  m.def("im2col", &im2col);
  m.def("popcount_gemm", &popcount_gemm);
}
