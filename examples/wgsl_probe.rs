//! Times one WGSL compute entry point on the default adapter: the tool behind the lavapipe
//! memory and dispatch figures in `docs/lavapipe.md`.
//!
//! ```sh
//! scripts/ensure-gpu.sh cargo run --release --example wgsl_probe -- \
//!     examples/probes/memory.wgsl relu_storage 3 1605632 6272 1 1 50 1605632
//! ```
//!
//! Arguments: the WGSL file, the entry point, the number of buffers B, the floats per buffer,
//! the workgroup grid (x y z), the dispatches to time, then the u32 parameters at binding 0 (an
//! `f` prefix writes an f32: `f0.1`). Bindings 1..=B are read-write storage buffers of that
//! size, filled with values in [-1, 1); with `--uniform-windows U` the first U of them are
//! bound instead as 64 KiB uniform windows at offset 0, and with `--textures T` the last T as
//! R32Float 2-d textures (4096 texels per row) holding the same values. `--override NAME=VALUE`
//! sets a pipeline-override constant (repeatable), `--trusted` builds the module without
//! runtime bounds checks, `--limits` prints the adapter's limits. All dispatches go in one
//! compute pass and one submit; the time per dispatch is the wall time to the end of the GPU
//! work, divided by their number (one untimed dispatch first compiles the pipeline).

use std::time::Instant;

use wgpu::util::DeviceExt;

const WINDOW_BYTES: u64 = 65536;
/// Texels per row of a `--textures` operand (R32Float, one float per texel).
const TEXTURE_WIDTH: u64 = 4096;

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let trusted = take_flag(&mut args, "--trusted");
    let limits = take_flag(&mut args, "--limits");
    let windows: u32 =
        take_value(&mut args, "--uniform-windows").map_or(0, |v| v.parse().expect("--uniform-windows N"));
    let mut constants: Vec<(String, f64)> = Vec::new();
    while let Some(c) = take_value(&mut args, "--override") {
        let (name, value) = c.split_once('=').expect("--override NAME=VALUE");
        constants.push((name.to_string(), value.parse().expect("an override value")));
    }
    let textures: u32 = take_value(&mut args, "--textures").map_or(0, |v| v.parse().expect("--textures T"));
    if args.len() < 8 {
        eprintln!("usage: wgsl_probe FILE ENTRY BUFFERS FLOATS GX GY GZ DISPATCHES [PARAM ...] [--uniform-windows U] [--trusted]");
        std::process::exit(2);
    }
    let source = std::fs::read_to_string(&args[0]).expect("readable WGSL file");
    let entry = args[1].as_str();
    let buffers: u32 = args[2].parse().expect("BUFFERS");
    if windows + textures > buffers {
        eprintln!("--uniform-windows and --textures take {} of {buffers} bindings", windows + textures);
        std::process::exit(2);
    }
    let first_texture = buffers - textures + 1;
    let floats: u64 = args[3].parse().expect("FLOATS");
    let grid: Vec<u32> = args[4..7].iter().map(|a| a.parse().expect("grid")).collect();
    let dispatches: u32 = args[7].parse().expect("DISPATCHES");
    let mut params: Vec<u32> = args[8..]
        .iter()
        .map(|a| match a.strip_prefix('f') {
            Some(f) => f.parse::<f32>().expect("f32 parameter").to_bits(),
            None => a.parse().expect("u32 parameter"),
        })
        .collect();
    params.resize(params.len().max(4).div_ceil(4) * 4, 0);

    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let adapter =
        pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions::default())).expect("an adapter");
    if limits {
        println!("{:#?}", adapter.limits());
    }
    let (device, queue) = pollster::block_on(
        adapter.request_device(&wgpu::DeviceDescriptor { required_limits: adapter.limits(), ..Default::default() }),
    )
    .expect("a device");
    let desc = wgpu::ShaderModuleDescriptor { label: None, source: wgpu::ShaderSource::Wgsl(source.into()) };
    let module = if trusted {
        // SAFETY: a measuring tool; the probe kernels index within the buffers they are given.
        unsafe { device.create_shader_module_trusted(desc, wgpu::ShaderRuntimeChecks::unchecked()) }
    } else {
        device.create_shader_module(desc)
    };
    let buffer_entry = |binding: u32, ty: wgpu::BufferBindingType| wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer { ty, has_dynamic_offset: false, min_binding_size: None },
        count: None,
    };
    let mut layout_entries = vec![buffer_entry(0, wgpu::BufferBindingType::Uniform)];
    for b in 1..=buffers {
        if b >= first_texture {
            layout_entries.push(wgpu::BindGroupLayoutEntry {
                binding: b,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Texture {
                    sample_type: wgpu::TextureSampleType::Float { filterable: false },
                    view_dimension: wgpu::TextureViewDimension::D2,
                    multisampled: false,
                },
                count: None,
            });
            continue;
        }
        let ty = if b <= windows {
            wgpu::BufferBindingType::Uniform
        } else {
            wgpu::BufferBindingType::Storage { read_only: false }
        };
        layout_entries.push(buffer_entry(b, ty));
    }
    let layout =
        device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor { label: None, entries: &layout_entries });
    let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
        label: None,
        bind_group_layouts: &[Some(&layout)],
        immediate_size: 0,
    });
    let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: None,
        layout: Some(&pipeline_layout),
        module: &module,
        entry_point: Some(entry),
        compilation_options: wgpu::PipelineCompilationOptions {
            constants: &constants.iter().map(|(k, v)| (k.as_str(), *v)).collect::<Vec<_>>(),
            ..Default::default()
        },
        cache: None,
    });
    let uniform = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: None,
        contents: bytemuck::cast_slice(&params),
        usage: wgpu::BufferUsages::UNIFORM,
    });
    let fill: Vec<f32> = (0..floats).map(|i| (i * 2654435761 % 1000) as f32 / 500.0 - 1.0).collect();
    let data: Vec<wgpu::Buffer> = (0..buffers)
        .map(|_| {
            device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: None,
                contents: bytemuck::cast_slice(&fill),
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::UNIFORM,
            })
        })
        .collect();
    let rows = floats.div_ceil(TEXTURE_WIDTH) as u32;
    // The texture data: the fill padded to whole rows (only built when a texture is asked for).
    let padded: Vec<f32> = if textures == 0 {
        Vec::new()
    } else {
        fill.iter().copied().chain(std::iter::repeat(0.0)).take((rows as u64 * TEXTURE_WIDTH) as usize).collect()
    };
    let views: Vec<wgpu::TextureView> = (0..textures)
        .map(|_| {
            let texture = device.create_texture_with_data(
                &queue,
                &wgpu::TextureDescriptor {
                    label: None,
                    size: wgpu::Extent3d { width: TEXTURE_WIDTH as u32, height: rows, depth_or_array_layers: 1 },
                    mip_level_count: 1,
                    sample_count: 1,
                    dimension: wgpu::TextureDimension::D2,
                    format: wgpu::TextureFormat::R32Float,
                    usage: wgpu::TextureUsages::TEXTURE_BINDING | wgpu::TextureUsages::COPY_DST,
                    view_formats: &[],
                },
                wgpu::util::TextureDataOrder::LayerMajor,
                bytemuck::cast_slice(&padded),
            );
            texture.create_view(&Default::default())
        })
        .collect();
    let mut entries = vec![wgpu::BindGroupEntry { binding: 0, resource: uniform.as_entire_binding() }];
    for (i, buffer) in data.iter().enumerate() {
        let binding = i as u32 + 1;
        if binding >= first_texture {
            let view = &views[(binding - first_texture) as usize];
            entries.push(wgpu::BindGroupEntry { binding, resource: wgpu::BindingResource::TextureView(view) });
            continue;
        }
        let resource = if binding <= windows {
            wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer,
                offset: 0,
                size: wgpu::BufferSize::new(WINDOW_BYTES),
            })
        } else {
            buffer.as_entire_binding()
        };
        entries.push(wgpu::BindGroupEntry { binding, resource });
    }
    let bind_group =
        device.create_bind_group(&wgpu::BindGroupDescriptor { label: None, layout: &layout, entries: &entries });
    let run = |n: u32| {
        let mut encoder = device.create_command_encoder(&Default::default());
        {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &bind_group, &[]);
            for _ in 0..n {
                pass.dispatch_workgroups(grid[0], grid[1], grid[2]);
            }
        }
        queue.submit([encoder.finish()]);
        device.poll(wgpu::PollType::wait_indefinitely()).expect("device poll");
    };
    run(1);
    let start = Instant::now();
    run(dispatches);
    let ms = start.elapsed().as_secs_f64() * 1e3 / dispatches as f64;
    println!("{entry}: {ms:.3} ms per dispatch ({dispatches} dispatches of {grid:?} workgroups)");
}

fn take_flag(args: &mut Vec<String>, flag: &str) -> bool {
    let before = args.len();
    args.retain(|a| a != flag);
    args.len() != before
}

fn take_value(args: &mut Vec<String>, flag: &str) -> Option<String> {
    let i = args.iter().position(|a| a == flag)?;
    args.remove(i);
    (i < args.len()).then(|| args.remove(i))
}
