//! Asking a Prometheus the canary analysis queries (`[[deploy.analysis.query]]`):
//! one instant query (`GET /api/v1/query`) per query, its answer reduced to
//! one number or a reason it has none.

use drover_core::analysis::QueryOutcome;
use serde::Deserialize;
use std::time::Duration;

/// How long one query may take.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(QUERY_TIMEOUT)
        .build()
        .unwrap_or_default()
}

#[derive(Deserialize)]
struct Answer {
    status: String,
    #[serde(default)]
    data: Option<Data>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Deserialize)]
struct Data {
    #[serde(rename = "resultType")]
    result_type: String,
    result: serde_json::Value,
}

/// Runs `promql` as an instant query on the Prometheus at `base`.
pub async fn query(client: &reqwest::Client, base: &str, promql: &str) -> QueryOutcome {
    let url = format!(
        "{base}/api/v1/query?query={}",
        drover_api::encode_query(promql)
    );
    let resp = match client.get(&url).send().await {
        Ok(r) => r,
        Err(e) => {
            let why = if e.is_timeout() {
                format!("Prometheus at {base} did not answer within {QUERY_TIMEOUT:?}")
            } else {
                format!("cannot reach Prometheus at {base}: {e}")
            };
            return QueryOutcome::Unavailable(why);
        }
    };
    let status = resp.status();
    let body = match resp.bytes().await {
        Ok(b) => b,
        Err(e) => return QueryOutcome::Unavailable(format!("Prometheus at {base}: {e}")),
    };
    let answer: Option<Answer> = serde_json::from_slice(&body).ok();
    match answer {
        // 400 bad_data, 422 execution error: the query itself is wrong.
        Some(a) if a.status == "error" && (status.as_u16() == 400 || status.as_u16() == 422) => {
            QueryOutcome::Invalid(format!(
                "Prometheus refused it: {}",
                a.error.unwrap_or_default()
            ))
        }
        Some(a) if a.status == "success" => match a.data {
            Some(d) => outcome(&d),
            None => QueryOutcome::Unavailable("Prometheus answered without data".into()),
        },
        _ => QueryOutcome::Unavailable(format!("Prometheus at {base} answered HTTP {status}")),
    }
}

/// One number from an instant query's result.
fn outcome(d: &Data) -> QueryOutcome {
    let sample = |v: &serde_json::Value| -> Option<f64> {
        // [ <unix time>, "<value>" ]
        let s = v.get(1)?.as_str()?;
        match s {
            "NaN" => Some(f64::NAN),
            "+Inf" => Some(f64::INFINITY),
            "-Inf" => Some(f64::NEG_INFINITY),
            _ => s.parse().ok(),
        }
    };
    match d.result_type.as_str() {
        "scalar" => sample(&d.result)
            .map(QueryOutcome::Value)
            .unwrap_or_else(|| QueryOutcome::Invalid("a scalar without a number".into())),
        "vector" => {
            let series = d.result.as_array().map(Vec::as_slice).unwrap_or(&[]);
            match series {
                [] => QueryOutcome::NoData,
                [one] => one
                    .get("value")
                    .and_then(sample)
                    .map(QueryOutcome::Value)
                    .unwrap_or_else(|| QueryOutcome::Invalid("a sample without a number".into())),
                many => QueryOutcome::Invalid(format!(
                    "it returned {} series, a condition needs one number; aggregate them, e.g. sum(...)",
                    many.len()
                )),
            }
        }
        other => QueryOutcome::Invalid(format!(
            "it returned a {other}; write an instant query that gives one number"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(t: &str, result: serde_json::Value) -> Data {
        Data {
            result_type: t.into(),
            result,
        }
    }

    #[test]
    fn answers_reduce_to_one_number_or_a_reason() {
        use serde_json::json;
        assert_eq!(
            outcome(&data("scalar", json!([1.0, "0.5"]))),
            QueryOutcome::Value(0.5)
        );
        assert_eq!(outcome(&data("vector", json!([]))), QueryOutcome::NoData);
        assert_eq!(
            outcome(&data(
                "vector",
                json!([{"metric": {}, "value": [1.0, "0.02"]}])
            )),
            QueryOutcome::Value(0.02)
        );
        assert!(matches!(
            outcome(&data("vector", json!([{"metric": {}, "value": [1.0, "NaN"]}]))),
            QueryOutcome::Value(v) if v.is_nan()
        ));
        assert!(matches!(
            outcome(&data("vector", json!([{"value": [1, "1"]}, {"value": [1, "2"]}]))),
            QueryOutcome::Invalid(w) if w.contains("2 series")
        ));
        assert!(matches!(
            outcome(&data("matrix", json!([]))),
            QueryOutcome::Invalid(_)
        ));
        assert_eq!(
            drover_api::encode_query("a{b=\"c\"}[5s] /x"),
            "a%7Bb%3D%22c%22%7D%5B5s%5D%20%2Fx"
        );
    }

    #[tokio::test]
    async fn an_unreachable_prometheus_is_unavailable_not_invalid() {
        // A port nothing listens on.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let o = query(&client(), &format!("http://{addr}"), "up").await;
        assert!(matches!(o, QueryOutcome::Unavailable(_)), "{o:?}");
    }
}
