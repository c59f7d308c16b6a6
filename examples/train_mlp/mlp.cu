// Forward and backward passes of a two-layer MLP (examples/train_mlp), one thread per
// output element: small, self-contained (no #include) kernels, compiled by NVRTC.
// Parameters and their gradients are stored as P (float or f16 bits); activations and
// all arithmetic are f32.

typedef unsigned short u16;

__device__ __forceinline__ float ld(const float* p, int i) { return p[i]; }
__device__ __forceinline__ float ld(const u16* p, int i) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(p[i]));
    return f;
}
__device__ __forceinline__ void st(float* p, int i, float v) { p[i] = v; }
__device__ __forceinline__ void st(u16* p, int i, float v) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    p[i] = h;
}

// Y[b, o] = sum_i X[b, i] W[o, i] + bias[o], then ReLU when relu != 0.
template <typename P>
__device__ void linear_forward(const float* X, const P* W, const P* bias, float* Y, int B, int I, int O, int relu) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= B * O) return;
    int b = t / O, o = t % O;
    float acc = ld(bias, o);
    for (int i = 0; i < I; ++i) acc += X[b * I + i] * ld(W, o * I + i);
    Y[t] = relu && acc < 0.0f ? 0.0f : acc;
}

// dX[b, i] = (sum_o dY[b, o] W[o, i]) * (A[b, i] > 0): back through the layer and the
// ReLU whose output A was its input.
template <typename P>
__device__ void linear_backward_input(const float* dY, const P* W, const float* A, float* dX, int B, int I, int O) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= B * I) return;
    int b = t / I, i = t % I;
    float acc = 0.0f;
    for (int o = 0; o < O; ++o) acc += dY[b * O + o] * ld(W, o * I + i);
    dX[t] = A[t] > 0.0f ? acc : 0.0f;
}

// dW[o, i] = sum_b dY[b, o] X[b, i] for t < O*I; dbias[o] = sum_b dY[b, o] for the O
// threads after those.
template <typename P>
__device__ void linear_backward_params(const float* dY, const float* X, P* dW, P* dbias, int B, int I, int O) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= O * I + O) return;
    float acc = 0.0f;
    if (t < O * I) {
        int o = t / I, i = t % I;
        for (int b = 0; b < B; ++b) acc += dY[b * O + o] * X[b * I + i];
        st(dW, t, acc);
    } else {
        int o = t - O * I;
        for (int b = 0; b < B; ++b) acc += dY[b * O + o];
        st(dbias, o, acc);
    }
}

// Per row: softmax of the logits, cross-entropy loss against label y[b], and the
// gradient of the batch-mean loss, (softmax - onehot) / B.
extern "C" __global__ void softmax_cross_entropy(const float* L, const int* y, float* loss, float* dL, int B, int C) {
    int b = blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= B) return;
    float m = L[b * C];
    for (int c = 1; c < C; ++c) m = fmaxf(m, L[b * C + c]);
    float sum = 0.0f;
    for (int c = 0; c < C; ++c) sum += expf(L[b * C + c] - m);
    loss[b] = logf(sum) - (L[b * C + y[b]] - m);
    for (int c = 0; c < C; ++c) dL[b * C + c] = (expf(L[b * C + c] - m) / sum - (c == y[b] ? 1.0f : 0.0f)) / B;
}

#define ENTRY(NAME, P, ARGS, CALL) extern "C" __global__ void NAME ARGS { CALL; }
ENTRY(linear_forward_f32, float, (const float* X, const float* W, const float* b, float* Y, int B, int I, int O, int r), linear_forward(X, W, b, Y, B, I, O, r))
ENTRY(linear_forward_f16, u16, (const float* X, const u16* W, const u16* b, float* Y, int B, int I, int O, int r), linear_forward(X, W, b, Y, B, I, O, r))
ENTRY(linear_backward_input_f32, float, (const float* dY, const float* W, const float* A, float* dX, int B, int I, int O), linear_backward_input(dY, W, A, dX, B, I, O))
ENTRY(linear_backward_input_f16, u16, (const float* dY, const u16* W, const float* A, float* dX, int B, int I, int O), linear_backward_input(dY, W, A, dX, B, I, O))
ENTRY(linear_backward_params_f32, float, (const float* dY, const float* X, float* dW, float* db, int B, int I, int O), linear_backward_params(dY, X, dW, db, B, I, O))
ENTRY(linear_backward_params_f16, u16, (const float* dY, const float* X, u16* dW, u16* db, int B, int I, int O), linear_backward_params(dY, X, dW, db, B, I, O))
