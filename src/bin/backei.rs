//! Temporary minimal binary exposing `backei data …` (replaced by the full CLI at merge).
use clap::Parser;

#[derive(Parser)]
#[command(name = "backei", about = "BackEISNN spiking networks", after_help = backei::data::EMBEDDED_SAMPLE_NOTICE)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Subcommand)]
enum Cmd {
    /// Dataset tools (fetch, inspect).
    Data {
        #[command(subcommand)]
        cmd: backei::data::cli::DataCommand,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Data { cmd } => backei::data::cli::run(cmd),
    }
}
