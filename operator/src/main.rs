//! The `weft` binary.

/// jemalloc: see operator/Cargo.toml and .cargo/config.toml for why and how it is tuned.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    weft::cli::main()
}
