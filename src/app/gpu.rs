//! The studio's two WGSL passes, drawn inside egui through `egui_wgpu` paint callbacks: the
//! latent preview (`shaders/latent_preview.wgsl`) and the compare view's difference heatmap
//! (`shaders/diff_heatmap.wgsl`). Both have CPU twins ([`crate::pipeline::preview`],
//! [`super::heatmap`]) used when the window has no wgpu renderer.

use std::collections::HashMap;
use std::sync::Arc;

use egui_wgpu::wgpu;
use egui_wgpu::wgpu::util::DeviceExt;

use crate::pipeline::image::RgbImage;
use crate::pipeline::preview::{Latent, PreviewFactors};

const PREVIEW_WGSL: &str = concat!(
    include_str!("../../shaders/fullscreen.wgsl"),
    include_str!("../../shaders/latent_preview.wgsl")
);
const HEATMAP_WGSL: &str = concat!(
    include_str!("../../shaders/fullscreen.wgsl"),
    include_str!("../../shaders/diff_heatmap.wgsl")
);

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct PreviewParams {
    size: [u32; 2],
    srgb_target: u32,
    /// Latent channels (the map's weights in their own buffer: any family's count).
    channels: u32,
    bias: [f32; 4],
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct HeatParams {
    size: [u32; 2],
    srgb_target: u32,
    gain: f32,
}

fn pipeline(
    device: &wgpu::Device,
    format: wgpu::TextureFormat,
    label: &str,
    source: &str,
    layout: &wgpu::BindGroupLayout,
) -> wgpu::RenderPipeline {
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some(label),
        source: wgpu::ShaderSource::Wgsl(source.into()),
    });
    let pl = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
        label: Some(label),
        bind_group_layouts: &[Some(layout)],
        immediate_size: 0,
    });
    device.create_render_pipeline(&wgpu::RenderPipelineDescriptor {
        label: Some(label),
        layout: Some(&pl),
        vertex: wgpu::VertexState {
            module: &module,
            entry_point: Some("vs_main"),
            buffers: &[],
            compilation_options: Default::default(),
        },
        fragment: Some(wgpu::FragmentState {
            module: &module,
            entry_point: Some("fs_main"),
            targets: &[Some(wgpu::ColorTargetState {
                format,
                blend: None,
                write_mask: wgpu::ColorWrites::ALL,
            })],
            compilation_options: Default::default(),
        }),
        primitive: wgpu::PrimitiveState::default(),
        depth_stencil: None,
        multisample: wgpu::MultisampleState::default(),
        multiview_mask: None,
        cache: None,
    })
}

/// GPU objects of both passes, kept in the renderer's callback resources.
pub struct GpuResources {
    srgb: bool,
    preview_pipeline: wgpu::RenderPipeline,
    preview_layout: wgpu::BindGroupLayout,
    /// (uploaded preview version, bind group).
    preview: Option<(u64, wgpu::BindGroup)>,
    heat_pipeline: wgpu::RenderPipeline,
    heat_layout: wgpu::BindGroupLayout,
    /// Bind groups per (reference, candidate, gain) key.
    heat: HashMap<(u64, u64, u32), wgpu::BindGroup>,
    textures: HashMap<u64, wgpu::TextureView>,
}

/// Storage buffers the preview pass reads in its fragment stage (the latent and the map).
const PREVIEW_STORAGE_BUFFERS: u32 = 2;

/// Whether a device with these limits can run both passes. The preview reads its latent and map
/// from storage buffers in the fragment stage, which OpenGL backends (wgpu's GL, WebGL2-level
/// limits) may not offer at all: there the studio draws both on the CPU.
pub fn supported(limits: &wgpu::Limits) -> bool {
    limits.max_storage_buffers_per_shader_stage >= PREVIEW_STORAGE_BUFFERS
}

/// Register the passes with the window's renderer; false (nothing registered, the CPU twins
/// draw) when its device cannot run them ([`supported`]).
pub fn install(rs: &egui_wgpu::RenderState) -> bool {
    let device = &rs.device;
    if !supported(&device.limits()) {
        tracing::info!(
            backend = ?rs.adapter.get_info().backend,
            "the window's renderer offers no storage buffers to fragment shaders: \
             previews and difference heatmaps are drawn on the CPU"
        );
        return false;
    }
    let uniform = |binding| wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::FRAGMENT,
        ty: wgpu::BindingType::Buffer {
            ty: wgpu::BufferBindingType::Uniform,
            has_dynamic_offset: false,
            min_binding_size: None,
        },
        count: None,
    };
    let storage = |binding| wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::FRAGMENT,
        ty: wgpu::BindingType::Buffer {
            ty: wgpu::BufferBindingType::Storage { read_only: true },
            has_dynamic_offset: false,
            min_binding_size: None,
        },
        count: None,
    };
    let preview_layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
        label: Some("latent preview"),
        entries: &[uniform(0), storage(1), storage(2)],
    });
    let tex = |binding| wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::FRAGMENT,
        ty: wgpu::BindingType::Texture {
            sample_type: wgpu::TextureSampleType::Float { filterable: false },
            view_dimension: wgpu::TextureViewDimension::D2,
            multisampled: false,
        },
        count: None,
    };
    let heat_layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
        label: Some("diff heatmap"),
        entries: &[uniform(0), tex(1), tex(2)],
    });
    let format = rs.target_format;
    let res = GpuResources {
        srgb: format.is_srgb(),
        preview_pipeline: pipeline(
            device,
            format,
            "latent preview",
            PREVIEW_WGSL,
            &preview_layout,
        ),
        preview_layout,
        preview: None,
        heat_pipeline: pipeline(device, format, "diff heatmap", HEATMAP_WGSL, &heat_layout),
        heat_layout,
        heat: HashMap::new(),
        textures: HashMap::new(),
    };
    rs.renderer.write().callback_resources.insert(res);
    true
}

/// Draws one latent through the preview map.
pub struct PreviewCallback {
    pub latent: Arc<Latent>,
    /// Changes whenever `latent` or the factors change (re-upload).
    pub version: u64,
    pub factors: Arc<PreviewFactors>,
}

impl egui_wgpu::CallbackTrait for PreviewCallback {
    fn prepare(
        &self,
        device: &wgpu::Device,
        _queue: &wgpu::Queue,
        _screen: &egui_wgpu::ScreenDescriptor,
        _encoder: &mut wgpu::CommandEncoder,
        resources: &mut egui_wgpu::CallbackResources,
    ) -> Vec<wgpu::CommandBuffer> {
        let Some(res) = resources.get_mut::<GpuResources>() else {
            return Vec::new();
        };
        if res
            .preview
            .as_ref()
            .is_some_and(|(v, _)| *v == self.version)
        {
            return Vec::new();
        }
        // The channels the map and the latent share (as PreviewFactors::apply reads them);
        // weights[ch * channels + c] is channel c's weight for output ch.
        let f = &self.factors;
        let channels = f.channels().min(self.latent.channels());
        let mut weights: Vec<f32> = (0..3)
            .flat_map(|ch| f.weights[ch][..channels].iter().copied())
            .collect();
        if weights.is_empty() {
            weights.push(0.0);
        }
        let params = PreviewParams {
            size: [self.latent.width as u32, self.latent.height as u32],
            srgb_target: u32::from(res.srgb),
            channels: channels as u32,
            bias: [f.bias[0], f.bias[1], f.bias[2], 0.0],
        };
        let wbuf = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("latent preview weights"),
            contents: bytemuck::cast_slice(&weights),
            usage: wgpu::BufferUsages::STORAGE,
        });
        let ubuf = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("latent preview params"),
            contents: bytemuck::bytes_of(&params),
            usage: wgpu::BufferUsages::UNIFORM,
        });
        let data: &[f32] = if self.latent.data.is_empty() {
            &[0.0]
        } else {
            &self.latent.data
        };
        let sbuf = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("latent"),
            contents: bytemuck::cast_slice(data),
            usage: wgpu::BufferUsages::STORAGE,
        });
        let bg = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("latent preview"),
            layout: &res.preview_layout,
            entries: &[
                wgpu::BindGroupEntry {
                    binding: 0,
                    resource: ubuf.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 1,
                    resource: sbuf.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 2,
                    resource: wbuf.as_entire_binding(),
                },
            ],
        });
        res.preview = Some((self.version, bg));
        Vec::new()
    }

    fn paint(
        &self,
        _info: egui::PaintCallbackInfo,
        pass: &mut wgpu::RenderPass<'static>,
        resources: &egui_wgpu::CallbackResources,
    ) {
        if let Some(GpuResources {
            preview: Some((_, bg)),
            preview_pipeline,
            ..
        }) = resources.get::<GpuResources>()
        {
            pass.set_pipeline(preview_pipeline);
            pass.set_bind_group(0, bg, &[]);
            pass.draw(0..3, 0..1);
        }
    }
}

/// Draws the difference heatmap of two images of equal size.
pub struct HeatmapCallback {
    /// Stable ids of the two images (their textures are uploaded once).
    pub reference: (u64, Arc<RgbImage>),
    pub candidate: (u64, Arc<RgbImage>),
    pub gain: f32,
}

fn upload(device: &wgpu::Device, queue: &wgpu::Queue, img: &RgbImage) -> wgpu::TextureView {
    let rgba: Vec<u8> = img
        .data
        .chunks_exact(3)
        .flat_map(|p| [p[0], p[1], p[2], 255])
        .collect();
    let tex = device.create_texture_with_data(
        queue,
        &wgpu::TextureDescriptor {
            label: Some("compare image"),
            size: wgpu::Extent3d {
                width: img.width as u32,
                height: img.height as u32,
                depth_or_array_layers: 1,
            },
            mip_level_count: 1,
            sample_count: 1,
            dimension: wgpu::TextureDimension::D2,
            format: wgpu::TextureFormat::Rgba8Unorm,
            usage: wgpu::TextureUsages::TEXTURE_BINDING,
            view_formats: &[],
        },
        wgpu::util::TextureDataOrder::LayerMajor,
        &rgba,
    );
    tex.create_view(&wgpu::TextureViewDescriptor::default())
}

impl HeatmapCallback {
    fn key(&self) -> (u64, u64, u32) {
        (self.reference.0, self.candidate.0, self.gain.to_bits())
    }
}

impl egui_wgpu::CallbackTrait for HeatmapCallback {
    fn prepare(
        &self,
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        _screen: &egui_wgpu::ScreenDescriptor,
        _encoder: &mut wgpu::CommandEncoder,
        resources: &mut egui_wgpu::CallbackResources,
    ) -> Vec<wgpu::CommandBuffer> {
        let Some(res) = resources.get_mut::<GpuResources>() else {
            return Vec::new();
        };
        let key = self.key();
        if res.heat.contains_key(&key) {
            return Vec::new();
        }
        for (id, img) in [&self.reference, &self.candidate] {
            if !res.textures.contains_key(id) {
                let view = upload(device, queue, img);
                res.textures.insert(*id, view);
            }
        }
        let (Some(a), Some(b)) = (
            res.textures.get(&self.reference.0),
            res.textures.get(&self.candidate.0),
        ) else {
            return Vec::new();
        };
        let params = HeatParams {
            size: [
                self.reference.1.width as u32,
                self.reference.1.height as u32,
            ],
            srgb_target: u32::from(res.srgb),
            gain: self.gain,
        };
        let ubuf = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("heatmap params"),
            contents: bytemuck::bytes_of(&params),
            usage: wgpu::BufferUsages::UNIFORM,
        });
        let bg = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("diff heatmap"),
            layout: &res.heat_layout,
            entries: &[
                wgpu::BindGroupEntry {
                    binding: 0,
                    resource: ubuf.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 1,
                    resource: wgpu::BindingResource::TextureView(a),
                },
                wgpu::BindGroupEntry {
                    binding: 2,
                    resource: wgpu::BindingResource::TextureView(b),
                },
            ],
        });
        res.heat.insert(key, bg);
        Vec::new()
    }

    fn paint(
        &self,
        _info: egui::PaintCallbackInfo,
        pass: &mut wgpu::RenderPass<'static>,
        resources: &egui_wgpu::CallbackResources,
    ) {
        if let Some(res) = resources.get::<GpuResources>() {
            if let Some(bg) = res.heat.get(&self.key()) {
                pass.set_pipeline(&res.heat_pipeline);
                pass.set_bind_group(0, bg, &[]);
                pass.draw(0..3, 0..1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_passes_need_fragment_storage_buffers() {
        assert!(supported(&wgpu::Limits::default()));
        assert!(supported(&wgpu::Limits::downlevel_defaults()));
        // WebGL2-level limits (what a GL backend may report): no storage buffers, CPU twins.
        let gl = wgpu::Limits::downlevel_webgl2_defaults();
        assert_eq!(gl.max_storage_buffers_per_shader_stage, 0);
        assert!(!supported(&gl));
    }
}
