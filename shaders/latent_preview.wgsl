// Latent preview: FLUX's 16 latent channels -> RGB through a fixed linear map fitted to the
// model's autoencoder (src/pipeline/preview.rs fits it; PreviewFactors::apply is the CPU twin).
// Drawn over the paint callback's viewport (fullscreen.wgsl); nearest latent position per pixel.

struct Params {
    // Latent width and height.
    size: vec2<u32>,
    // 1 when the render target is sRGB (the hardware encodes; we output linear).
    srgb_target: u32,
    _pad: u32,
    // weights[4 * ch + c / 4][c % 4] is channel c's weight for output ch (R, G, B).
    weights: array<vec4<f32>, 12>,
    bias: vec4<f32>,
};

@group(0) @binding(0) var<uniform> params: Params;
// Channel-major latent: latent[(c * h + y) * w + x].
@group(0) @binding(1) var<storage, read> latent: array<f32>;

@fragment
fn fs_main(in: VsOut) -> @location(0) vec4<f32> {
    let w = params.size.x;
    let h = params.size.y;
    let px = min(u32(in.uv.x * f32(w)), w - 1u);
    let py = min(u32(in.uv.y * f32(h)), h - 1u);
    let plane = w * h;
    let at = py * w + px;
    var rgb = params.bias.xyz;
    for (var c = 0u; c < 16u; c = c + 1u) {
        let z = latent[c * plane + at];
        let q = c / 4u;
        let r = c % 4u;
        rgb.x = rgb.x + params.weights[q][r] * z;
        rgb.y = rgb.y + params.weights[4u + q][r] * z;
        rgb.z = rgb.z + params.weights[8u + q][r] * z;
    }
    // [-1, 1] -> bytes, rounded as the CPU path rounds, then [0, 1].
    var v = round((clamp(rgb, vec3<f32>(-1.0), vec3<f32>(1.0)) + 1.0) * 127.5) / 255.0;
    if (params.srgb_target == 1u) {
        v = srgb_to_linear(v);
    }
    return vec4<f32>(v, 1.0);
}
