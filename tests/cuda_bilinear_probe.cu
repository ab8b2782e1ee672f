// Test-only kernel, appended to the inlined bilinear.cuh: evaluates one bilinear rule of a single
// plane at given positions -- value and d/dh, d/dw -- and scatters a gradient per position, so
// tests can hold both rules against the reference before any op uses them.
template <typename T>
__global__ void bilinear_probe(const long long n_positions, const T* __restrict__ image,
                               const long long height, const long long width,
                               const T* __restrict__ positions, const int border_clamped,
                               const T* __restrict__ gradients,
                               pydeform::acc_t<T>* __restrict__ samples,
                               pydeform::acc_t<T>* __restrict__ grad_image) {
    using namespace pydeform;
    using A = acc_t<T>;
    for (long long p = grid_stride_begin(); p < n_positions; p += grid_stride_step()) {
        const A h = load_acc(positions + 2 * p);
        const A w = load_acc(positions + 2 * p + 1);
        const BilinearCorners<A> corners = border_clamped
                                               ? border_clamped_corners(h, w, height, width)
                                               : zero_padded_corners(h, w, height, width);
        A values[4];
        load_corners(corners, image, values);
        samples[3 * p] = corner_dot(corners.weight, values);
        samples[3 * p + 1] = corner_dot(corners.weight_dh, values);
        samples[3 * p + 2] = corner_dot(corners.weight_dw, values);
        scatter_corners(corners, grad_image, A(load_acc(gradients + p)));
    }
}
