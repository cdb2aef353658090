// Difference heatmap for the compare view: per pixel, the largest channel difference between an
// image and the uncached reference, times a gain, through a black-red-yellow-white ramp.
// src/app/heatmap.rs has the CPU twin (heat_color) used when no GPU renderer is present.

struct Params {
    size: vec2<u32>,
    srgb_target: u32,
    gain: f32,
};

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var reference: texture_2d<f32>;
@group(0) @binding(2) var candidate: texture_2d<f32>;

// t in [0, 1]: black -> red (1/3) -> yellow (2/3) -> white (1).
fn ramp(t: f32) -> vec3<f32> {
    let s = clamp(t, 0.0, 1.0) * 3.0;
    return vec3<f32>(clamp(s, 0.0, 1.0), clamp(s - 1.0, 0.0, 1.0), clamp(s - 2.0, 0.0, 1.0));
}

@fragment
fn fs_main(in: VsOut) -> @location(0) vec4<f32> {
    let p = vec2<u32>(
        min(u32(in.uv.x * f32(params.size.x)), params.size.x - 1u),
        min(u32(in.uv.y * f32(params.size.y)), params.size.y - 1u),
    );
    let a = textureLoad(reference, p, 0).rgb;
    let b = textureLoad(candidate, p, 0).rgb;
    let d = abs(a - b);
    var v = ramp(max(d.x, max(d.y, d.z)) * params.gain);
    if (params.srgb_target == 1u) {
        v = srgb_to_linear(v);
    }
    return vec4<f32>(v, 1.0);
}
