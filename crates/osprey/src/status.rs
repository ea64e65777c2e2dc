//! `osprey status`: the cluster as the gateway sees it (nodes, health, load, recent latency).

use bytes::Bytes;
use comfy_table::Table;
use http_body_util::{BodyExt, Empty};

#[derive(clap::Args)]
pub struct StatusArgs {
    /// The gateway's HTTP address (host:port).
    #[arg(long, default_value = "127.0.0.1:8000")]
    target: String,
    /// API key, when tenants have keys.
    #[arg(long)]
    api_key: Option<String>,
    /// Print the JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: StatusArgs) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    let body = rt.block_on(async {
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http::<Empty<Bytes>>();
        let mut req = hyper::Request::get(format!("http://{}/v2/cluster", args.target));
        if let Some(k) = &args.api_key {
            req = req.header("authorization", format!("Bearer {k}"));
        }
        let req = req.body(Empty::new()).map_err(|e| e.to_string())?;
        let resp = tokio::time::timeout(std::time::Duration::from_secs(5), client.request(req))
            .await
            .map_err(|_| format!("no answer from {} within 5 s", args.target))?
            .map_err(|e| format!("{}: {e}", args.target))?;
        let status = resp.status();
        let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        if !status.is_success() {
            return Err(format!(
                "{}: HTTP {}: {}",
                args.target,
                status.as_u16(),
                String::from_utf8_lossy(&body)
            ));
        }
        Ok(body)
    })?;
    if args.json {
        println!("{}", String::from_utf8_lossy(&body));
        return Ok(());
    }
    let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    let mut table = Table::new();
    table.set_header([
        "node",
        "kind",
        "up",
        "workers",
        "busy",
        "cpu load",
        "memory MB",
        "memory used MB",
        "slowdown",
        "mean batch ms",
        "recent failures",
        "instances",
        "replicas",
    ]);
    for n in v["nodes"].as_array().into_iter().flatten() {
        table.add_row([
            n["name"].as_str().unwrap_or("?").to_string(),
            n["kind"].as_str().unwrap_or("?").to_string(),
            n["up"].to_string(),
            n["workers"].to_string(),
            n["busy"].to_string(),
            format!("{:.2}", n["cpu_load"].as_f64().unwrap_or(0.0)),
            n["memory_mb"].to_string(),
            n["memory_used_mb"].to_string(),
            format!("{:.2}", n["slowdown"].as_f64().unwrap_or(0.0)),
            format!("{:.2}", n["mean_service_ms"].as_f64().unwrap_or(0.0)),
            n["recent_failures"].to_string(),
            n["instances"]
                .as_array()
                .map(|a| a.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(" "))
                .unwrap_or_default(),
            n["replicas"]
                .as_object()
                .map(|o| o.iter().map(|(m, q)| format!("{m}:{q}")).collect::<Vec<_>>().join(" "))
                .unwrap_or_default(),
        ]);
    }
    println!("{table}");
    for s in v["splits"].as_array().into_iter().flatten() {
        let plan: Vec<String> = s["stages"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|st| format!("{} {}", st[0].as_str().unwrap_or("?"), st[1].as_str().unwrap_or("?")))
            .collect();
        println!(
            "\nsplit model {} (units 0..{} trusted only): epoch {} ({}), answered {}, retried {}, failed {}",
            s["model"].as_str().unwrap_or("?"),
            s["private_units"],
            s["epoch"].as_u64().map_or("none".to_string(), |e| e.to_string()),
            if plan.is_empty() { "no plan".to_string() } else { plan.join(" -> ") },
            s["answered"],
            s["retried"],
            s["failed"],
        );
        let mut t = Table::new();
        t.set_header([
            "node",
            "trusted",
            "speed factor",
            "unit ms",
            "unit MB",
            "links (ms, MB/s)",
            "received by unit",
        ]);
        for n in s["nodes"].as_array().into_iter().flatten() {
            let units: Vec<String> = n["unit_ms"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|u| format!("{:.2}", u.as_f64().unwrap_or(0.0)))
                .collect();
            let mbs: Vec<String> = n["unit_mb"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|u| format!("{:.1}", u.as_f64().unwrap_or(0.0)))
                .collect();
            let links: Vec<String> = n["links"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(to, l)| {
                    format!("{to}: {:.2}, {:.0}", l[0].as_f64().unwrap_or(0.0), l[1].as_f64().unwrap_or(0.0))
                })
                .collect();
            let received: Vec<String> =
                n["received"].as_object().into_iter().flatten().map(|(k, c)| format!("{k}:{c}")).collect();
            t.add_row([
                n["name"].as_str().unwrap_or("?").to_string(),
                n["trusted"].to_string(),
                format!("{:.2}", n["speed_factor"].as_f64().unwrap_or(1.0)),
                units.join(" "),
                mbs.join(" "),
                links.join("; "),
                received.join(" "),
            ]);
        }
        println!("{t}");
    }
    Ok(())
}
