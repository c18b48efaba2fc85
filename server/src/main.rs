//! `handover-server`: the operator's command line (see [`handover_server::cli`]).

#[tokio::main]
async fn main() -> std::process::ExitCode {
    handover_server::cli::main().await
}
