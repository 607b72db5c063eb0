//! `fleetline-cloud`: the cloud node binary.

fn main() -> std::process::ExitCode {
    fleetline_cloud::cli::main_with_args(std::env::args_os())
}
