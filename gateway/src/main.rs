//! `fleetline-gateway`: the edge gateway binary.

fn main() -> std::process::ExitCode {
    fleetline_gateway::cli::main_with_args(std::env::args_os())
}
