use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = caption_cascade::cli::Cli::parse();
    let telemetry = match cli.telemetry.install() {
        Ok(telemetry) => telemetry,
        Err(e) => {
            eprintln!("error: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = caption_cascade::cli::run(cli).await;
    if let Err(e) = &result {
        telemetry.fatal(e);
    }
    telemetry.shutdown().await;
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(_) => std::process::ExitCode::FAILURE,
    }
}
