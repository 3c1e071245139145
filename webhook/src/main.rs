//! The `weft-webhook` binary.

fn main() -> std::process::ExitCode {
    weft_webhook::server::main()
}
