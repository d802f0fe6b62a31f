//! `fencelock status`: who holds a lock.

use std::process::ExitCode;

use crate::{StatusArgs, failed, store_url};

pub(crate) async fn status(args: StatusArgs) -> ExitCode {
    let result = async {
        let locker = fencelock::connect(&store_url(&args.store)?).await?;
        let state = locker.inspect(&args.name).await?;
        Ok::<_, fencelock::Error>((locker.capabilities().store, state))
    }
    .await;
    let (store, state) = match result {
        Ok(found) => found,
        Err(err) => return failed(&err),
    };
    if args.json {
        let value = match &state {
            Some(s) => serde_json::json!({
                "name": args.name, "store": store, "held": true,
                "holder": s.holder.as_str(), "token": s.token.0,
                "remaining_ms": s.remaining.map(|r| r.as_millis() as u64),
            }),
            None => serde_json::json!({ "name": args.name, "store": store, "held": false }),
        };
        println!("{value}");
    } else {
        match &state {
            Some(s) => {
                let remaining = s.remaining.map_or_else(
                    || "while its session lives".to_owned(),
                    |r| format!("for {:.1}s more", r.as_secs_f64()),
                );
                println!(
                    "lock `{}` on {store}: held by {} with token {}, {remaining}",
                    args.name, s.holder, s.token
                );
            }
            None => println!("lock `{}` on {store}: free", args.name),
        }
    }
    ExitCode::SUCCESS
}
