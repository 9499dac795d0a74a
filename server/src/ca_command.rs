//! `tether-server ca`: the commands of a CA rotation (the work is `tether_server::rotate`'s).

use crate::StoreArgs;
use anyhow::Result;
use clap::Subcommand;
use std::path::PathBuf;

#[derive(Subcommand)]
pub(crate) enum CaCommand {
    /// Start a CA rotation: a new CA that issues from now on, the old one trusted until `ca
    /// finish`. On every other master, run it with --from (a copy of this master's data
    /// directory).
    Rotate {
        #[arg(long, env = "TETHER_DATA_DIR")]
        data_dir: PathBuf,
        /// Adopt the rotation another master started, from a copy of its ca.crt, ca.key,
        /// ca-old.crt, ca-cross.crt (and ca-rotation with the data-directory store).
        #[arg(long)]
        from: Option<PathBuf>,
        /// Lifetime of the new CA, in days.
        #[arg(long, env = "TETHER_CA_DAYS", default_value_t = tether_trust::CA_DAYS)]
        ca_days: u32,
        /// Lifetime of this master's new server certificate, in days.
        #[arg(long, env = "TETHER_DAYS", default_value_t = tether_trust::LEAF_DAYS)]
        days: u32,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Show this master's CAs, the rotation, and the nodes still on the old CA.
    Status {
        #[arg(long, env = "TETHER_DATA_DIR")]
        data_dir: PathBuf,
        /// text or json.
        #[arg(long, default_value = "text")]
        output: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// End the rotation: the old CA is trusted no more. Refused while nodes remain on it.
    Finish {
        #[arg(long, env = "TETHER_DATA_DIR")]
        data_dir: PathBuf,
        /// Finish even so: the nodes left on the old CA must join again.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
}

pub(crate) async fn run(c: CaCommand) -> Result<()> {
    use tether_server::rotate;
    let (report, json) = match c {
        CaCommand::Rotate {
            data_dir: d,
            from,
            ca_days,
            days,
            store: s,
        } => {
            let r = rotate::rotate(&d, &s.open(&d)?, from.as_deref(), ca_days, days).await?;
            println!("rotation started here: the new CA issues from now on, both CAs are trusted, and connected nodes are asked to renew");
            (r, false)
        }
        CaCommand::Status {
            data_dir: d,
            output,
            store: s,
        } => (rotate::status(&d, &s.open(&d)?).await?, output == "json"),
        CaCommand::Finish {
            data_dir: d,
            force,
            store: s,
        } => (rotate::finish(&d, &s.open(&d)?, force).await?, false),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.text());
    }
    Ok(())
}
