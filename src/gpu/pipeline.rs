//! The pipeline cache: each WGSL file is validated by naga and turned into a shader module
//! once per device, and each (file, entry point, override constants) into a compute
//! pipeline once per device. lavapipe compiles a pipeline in 0.2-1.8 s, so this matters.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};

include!(concat!(env!("OUT_DIR"), "/shaders.rs"));

/// The WGSL source of `shaders/<name>.wgsl`.
pub fn shader_source(name: &str) -> Option<&'static str> {
    SHADERS.iter().find(|(n, _)| *n == name).map(|(_, s)| *s)
}

/// Names of every embedded shader file.
pub fn shader_names() -> impl Iterator<Item = &'static str> {
    SHADERS.iter().map(|(n, _)| *n)
}

/// Parses and validates WGSL with naga, as wgpu would, returning the module and its analysis.
pub fn validate_wgsl(name: &str, source: &str) -> Result<(naga::Module, naga::valid::ModuleInfo)> {
    let module = naga::front::wgsl::parse_str(source).map_err(|e| Error::ShaderValidation {
        name: name.to_string(),
        message: e.emit_to_string_with_path(source, &format!("shaders/{name}.wgsl")),
    })?;
    let info = naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::default())
        .validate(&module)
        .map_err(|e| Error::ShaderValidation {
            name: name.to_string(),
            message: e.emit_to_string_with_path(source, &format!("shaders/{name}.wgsl")),
        })?;
    Ok((module, info))
}

/// A compiled pipeline with the bindings (group 0) its entry point really uses: launchers
/// pass every argument and the dispatcher binds these. Binding 0 (the dispatch's parameter
/// struct) has a dynamic offset into the batch's parameter buffer, so a bind group depends
/// only on the tensors bound and can be reused from iteration to iteration.
pub(crate) struct CachedPipeline {
    pub pipeline: wgpu::ComputePipeline,
    pub layout: wgpu::BindGroupLayout,
    pub used_bindings: Vec<u32>,
    /// Process-unique id (the bind-group cache's key).
    pub id: u64,
}

struct ShaderEntry {
    module: wgpu::ShaderModule,
    naga: naga::Module,
    info: naga::valid::ModuleInfo,
}

type Constants = Vec<(&'static str, u64)>;
/// The compiled override-constant sets of one (file, entry point).
type Variants = Vec<(Constants, Arc<CachedPipeline>)>;

#[derive(Default)]
pub(crate) struct PipelineCache {
    shaders: Mutex<HashMap<&'static str, Arc<ShaderEntry>>>,
    /// Per (file, entry point): the override-constant sets compiled so far. A lookup
    /// compares the constants in place and allocates nothing.
    pipelines: Mutex<HashMap<(&'static str, &'static str), Variants>>,
}

static NEXT_PIPELINE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn same_constants(a: &Constants, b: &[(&'static str, f64)]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|((ka, va), (kb, vb))| ka == kb && *va == vb.to_bits())
}

impl PipelineCache {
    /// Number of pipelines compiled on this device so far.
    pub fn len(&self) -> usize {
        self.pipelines.lock().unwrap().values().map(Vec::len).sum()
    }

    fn shader(&self, device: &wgpu::Device, name: &'static str, runtime_checks: bool) -> Result<Arc<ShaderEntry>> {
        if let Some(s) = self.shaders.lock().unwrap().get(name) {
            return Ok(s.clone());
        }
        let source = shader_source(name).ok_or_else(|| Error::UnknownShader(name.to_string()))?;
        let (naga, info) = validate_wgsl(name, source)?;
        let desc = wgpu::ShaderModuleDescriptor { label: Some(name), source: wgpu::ShaderSource::Wgsl(source.into()) };
        let module = if runtime_checks {
            device.create_shader_module(desc)
        } else {
            // SAFETY: every kernel guards its indices against the sizes it is launched with
            // (checked by the launchers) and naga has validated the module above; the bounds
            // checks wgpu would add cost a compare and a select per memory access. The
            // `--shader-checks on` switch puts them back to hunt a suspected out-of-bounds access.
            unsafe { device.create_shader_module_trusted(desc, wgpu::ShaderRuntimeChecks::unchecked()) }
        };
        let entry = Arc::new(ShaderEntry { module, naga, info });
        self.shaders.lock().unwrap().insert(name, entry.clone());
        Ok(entry)
    }

    pub fn get(
        &self,
        device: &wgpu::Device,
        shader: &'static str,
        entry: &'static str,
        constants: &[(&'static str, f64)],
        runtime_checks: bool,
    ) -> Result<Arc<CachedPipeline>> {
        if let Some(v) = self.pipelines.lock().unwrap().get(&(shader, entry)) {
            if let Some((_, p)) = v.iter().find(|(c, _)| same_constants(c, constants)) {
                return Ok(p.clone());
            }
        }
        let s = self.shader(device, shader, runtime_checks)?;
        let ep_index = s
            .naga
            .entry_points
            .iter()
            .position(|e| e.name == entry)
            .ok_or_else(|| Error::UnknownShader(format!("{shader}::{entry}")))?;
        let ep_info = s.info.get_entry_point(ep_index);
        let mut used: Vec<(u32, wgpu::BufferBindingType)> = s
            .naga
            .global_variables
            .iter()
            .filter_map(|(h, var)| {
                let b = var.binding.as_ref()?;
                if b.group != 0 || ep_info[h].is_empty() {
                    return None;
                }
                let ty = match var.space {
                    naga::AddressSpace::Uniform => wgpu::BufferBindingType::Uniform,
                    naga::AddressSpace::Storage { access } => {
                        wgpu::BufferBindingType::Storage { read_only: !access.contains(naga::StorageAccess::STORE) }
                    }
                    _ => return None,
                };
                Some((b.binding, ty))
            })
            .collect();
        used.sort_unstable_by_key(|(b, _)| *b);
        if used.first().is_some_and(|(b, ty)| *b == 0 && *ty != wgpu::BufferBindingType::Uniform) {
            return Err(Error::UnknownShader(format!("{shader}::{entry}: binding 0 must be the uniform parameters")));
        }
        let entries: Vec<wgpu::BindGroupLayoutEntry> = used
            .iter()
            .map(|&(binding, ty)| wgpu::BindGroupLayoutEntry {
                binding,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer { ty, has_dynamic_offset: binding == 0, min_binding_size: None },
                count: None,
            })
            .collect();
        let label = format!("{shader}::{entry}");
        let layout = device
            .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor { label: Some(&label), entries: &entries });
        let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some(&label),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(&label),
            layout: Some(&pipeline_layout),
            module: &s.module,
            entry_point: Some(entry),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants,
                zero_initialize_workgroup_memory: false,
            },
            cache: None,
        });
        let cached = Arc::new(CachedPipeline {
            pipeline,
            layout,
            used_bindings: used.iter().map(|(b, _)| *b).collect(),
            id: NEXT_PIPELINE.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        });
        let key_constants = constants.iter().map(|(k, v)| (*k, v.to_bits())).collect();
        self.pipelines.lock().unwrap().entry((shader, entry)).or_default().push((key_constants, cached.clone()));
        Ok(cached)
    }
}
