//! The `weft` binary.

fn main() -> std::process::ExitCode {
    weft::cli::main()
}
