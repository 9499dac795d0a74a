//! `tether-server demo`.

pub async fn run() -> anyhow::Result<()> {
    Ok(())
}
