//! The `featreplay` command-line tool.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use featreplay::demo::{self, DemoConfig};
use featreplay::gpu::{list_adapters, AdapterSelector};
use featreplay::kernels::conv2d;
use featreplay::Gpu;

#[derive(Parser)]
#[command(name = "featreplay", version, about = "Features Replay training of deep conv nets on any wgpu GPU")]
struct Cli {
    /// Adapter: an index from `featreplay devices`, `type:discrete|integrated|cpu`,
    /// `backend:vulkan|metal|dx12|gl`, or a name substring. Default: the best real GPU.
    #[arg(long, global = true, env = "FEATREPLAY_ADAPTER")]
    device: Option<String>,

    /// Conv kernel variant: `direct` (CPU adapters), `tiled` (GPUs) or `tune` (time both per
    /// shape). Default: chosen by adapter type.
    #[arg(long, global = true, env = "FEATREPLAY_CONV_VARIANT")]
    conv_variant: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List every GPU adapter wgpu can reach.
    Devices,
    /// Train a small residual network on random data (the foundation's demo job).
    Demo {
        #[arg(long, default_value_t = 8)]
        epochs: usize,
        #[arg(long, default_value_t = 512)]
        samples: usize,
        #[arg(long, default_value_t = 64)]
        batch_size: usize,
        /// Image side in pixels.
        #[arg(long, default_value_t = 16)]
        size: usize,
        /// Channels of the first block (the second has twice as many).
        #[arg(long, default_value_t = 16)]
        width: usize,
        #[arg(long, default_value_t = 0.05)]
        lr: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

fn open_device(cli: &Cli) -> Result<Gpu> {
    let selector: AdapterSelector = match &cli.device {
        Some(s) => s.parse().context("reading --device")?,
        None => AdapterSelector::Auto,
    };
    let gpu = Gpu::open(&selector).with_context(|| format!("opening a device on adapter '{selector}'"))?;
    if let Some(v) = &cli.conv_variant {
        if v.trim() != "tune" {
            v.parse::<conv2d::ConvVariant>().context("reading --conv-variant")?;
        }
        gpu.force_variant(conv2d::OP, Some(v.trim()));
    }
    Ok(gpu)
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Devices => {
            let adapters = list_adapters();
            if adapters.is_empty() {
                anyhow::bail!("no GPU adapter found. {}", featreplay::gpu::adapter::no_adapter_hint());
            }
            for a in &adapters {
                println!("{a}");
            }
            println!("default: [0] (override with --device or FEATREPLAY_ADAPTER)");
        }
        Command::Demo { epochs, samples, batch_size, size, width, lr, seed } => {
            let gpu = open_device(&cli)?;
            let cfg = DemoConfig { samples, batch: batch_size, size, width, epochs, lr, seed, ..Default::default() };
            println!("device: {}", gpu.adapter());
            println!(
                "training a residual net ({width}/{} channels) on {samples} random {size}x{size} images, batch {batch_size}, {epochs} epochs",
                2 * width
            );
            let reports = demo::run(&gpu, &cfg, |r| {
                println!(
                    "epoch {:>3}  loss {:.4}  train top-1 {:>5.1}%  {:>7.1} img/s  {:>6.2} s  peak memory {:.1} MiB",
                    r.epoch,
                    r.loss,
                    100.0 * r.accuracy,
                    r.images_per_second,
                    r.seconds,
                    r.peak_memory_bytes as f64 / (1024.0 * 1024.0)
                );
            })
            .context("training the demo network")?;
            if let (Some(first), Some(last)) = (reports.first(), reports.last()) {
                println!("loss {:.4} -> {:.4}", first.loss, last.loss);
            }
        }
    }
    Ok(())
}

fn main() {
    // lavapipe probes Wayland and complains when XDG_RUNTIME_DIR is unset; compute does not
    // need it. Set before any wgpu instance exists (single-threaded here).
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        std::env::set_var("XDG_RUNTIME_DIR", std::env::temp_dir());
    }
    env_logger::init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("featreplay: error: {e:#}");
        std::process::exit(1);
    }
}
