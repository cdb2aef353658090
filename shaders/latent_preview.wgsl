// Latent preview: a family's latent channels (FLUX.1's 16, any count) -> RGB through a fixed
// linear map fitted to the model's autoencoder (src/pipeline/preview.rs fits it; PreviewFactors::apply is the CPU twin).
// Drawn over the paint callback's viewport (fullscreen.wgsl); filtered: each pixel takes the
// latent bilinearly interpolated between the four nearest positions (the map is linear, so this
// is the interpolated colours' map): a 256 px image's 32x32 latent shows smooth, not as hard blocks.

struct Params {
    // Latent width and height.
    size: vec2<u32>,
    // 1 when the render target is sRGB (the hardware encodes; we output linear).
    srgb_target: u32,
    // Latent channels: planes of the latent, weights per output.
    channels: u32,
    bias: vec4<f32>,
};

@group(0) @binding(0) var<uniform> params: Params;
// Channel-major latent: latent[(c * h + y) * w + x].
@group(0) @binding(1) var<storage, read> latent: array<f32>;
// weights[ch * channels + c] is channel c's weight for output ch (R, G, B).
@group(0) @binding(2) var<storage, read> weights: array<f32>;

@fragment
fn fs_main(in: VsOut) -> @location(0) vec4<f32> {
    let w = params.size.x;
    let h = params.size.y;
    // Latent positions sit at the centres of their cells.
    let f = clamp(
        in.uv * vec2<f32>(f32(w), f32(h)) - 0.5,
        vec2<f32>(0.0),
        vec2<f32>(f32(w - 1u), f32(h - 1u))
    );
    let x0 = u32(floor(f.x));
    let y0 = u32(floor(f.y));
    let x1 = min(x0 + 1u, w - 1u);
    let y1 = min(y0 + 1u, h - 1u);
    let t = f - floor(f);
    let plane = w * h;
    var rgb = params.bias.xyz;
    let n = params.channels;
    for (var c = 0u; c < n; c = c + 1u) {
        let base = c * plane;
        let top = mix(latent[base + y0 * w + x0], latent[base + y0 * w + x1], t.x);
        let bottom = mix(latent[base + y1 * w + x0], latent[base + y1 * w + x1], t.x);
        let z = mix(top, bottom, t.y);
        rgb.x = rgb.x + weights[c] * z;
        rgb.y = rgb.y + weights[n + c] * z;
        rgb.z = rgb.z + weights[2u * n + c] * z;
    }
    // [-1, 1] -> bytes, rounded as the CPU path rounds, then [0, 1].
    var v = round((clamp(rgb, vec3<f32>(-1.0), vec3<f32>(1.0)) + 1.0) * 127.5) / 255.0;
    if (params.srgb_target == 1u) {
        v = srgb_to_linear(v);
    }
    return vec4<f32>(v, 1.0);
}
