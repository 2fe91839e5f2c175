//! Upstream credential sources (`credentials:` of an upstream): each flow against a local
//! emulation of its auth endpoint, with a real docker-registry on the registry side.
//! ECR against moto (signatures and IAM policies checked), GCP and ACR against small fakes that
//! check what they are sent, credential helpers as scripts, and a PAT in the token flow.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::pull::pull_oci_and_check;
use crate::support::dockside::{Config, Dockside, Upstream};
use crate::support::endpoint::{Endpoint, Request};
use crate::support::image::{Format, Image};
use crate::support::moto::{self, Moto};
use crate::support::registry::{Auth, Registry, count};
use crate::support::tools;
use crate::support::{http, skopeo};

/// A registry accepting `user` / `password`, holding one image at `team/app:v1`.
fn registry_with_image(auth: Auth, user: &str, password: &str, seed: u64) -> (Registry, Image) {
    let reg = Registry::start_as(auth, user, password);
    let img = Image::generate(seed, &[70_000, 9_000], Format::Oci);
    skopeo::push(&reg, "team/app", "v1", &img);
    (reg, img)
}

/// An upstream for `reg` named `name`, with `credentials:` as given (YAML under the key).
fn upstream_with(name: &str, reg: &Registry, credentials: &str) -> Upstream {
    let indented: String = credentials
        .lines()
        .map(|l| format!("      {l}\n"))
        .collect();
    Upstream {
        name: name.into(),
        url: reg.url(),
        extra_yaml: format!("    credentials:\n{indented}"),
        ..Default::default()
    }
}

/// Blob GETs the registry answered 200: the pull really went through it, authenticated.
fn authenticated_blob_gets(reg: &Registry) -> usize {
    reg.access_log()
        .iter()
        .filter(|l| l.method == "GET" && l.uri.contains("/blobs/sha256:") && l.status == 200)
        .count()
}

fn write_executable(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

// ---------------------------------------------------------------------------------------------
// Docker credential helper

#[test]
fn credential_helper_answers_and_is_asked_again_when_refused() {
    let (reg, img) = registry_with_image(Auth::Basic, "helper-user", "helper-pw-1", 5001);
    let dir = tempfile::tempdir().unwrap();
    let calls = dir.path().join("calls");
    // A helper in the protocol's shape whose first answer is stale (refused by the registry),
    // as a rotated password would be; every later answer is right.
    let helper = dir.path().join("docker-credential-e2e");
    write_executable(
        &helper,
        &format!(
            "#!/bin/sh\n[ \"$1\" = get ] || exit 3\nread host\necho \"$host\" >> {calls}\n\
             if [ $(wc -l < {calls}) -eq 1 ]; then pw=stale-pw; else pw=helper-pw-1; fi\n\
             printf '{{\"ServerURL\":\"%s\",\"Username\":\"helper-user\",\"Secret\":\"%s\"}}' \"$host\" \"$pw\"\n",
            calls = calls.display()
        ),
    );
    let mut cfg = Config::new(vec![upstream_with("registry.example", &reg, "helper: e2e")]);
    let path = format!(
        "{}:{}",
        dir.path().display(),
        std::env::var("PATH").unwrap()
    );
    cfg.env.push(("PATH".into(), path));
    let d = Dockside::start(&cfg);

    pull_oci_and_check(&d, "registry.example/team/app:v1", &img);
    let asked = std::fs::read_to_string(&calls).unwrap();
    assert_eq!(
        asked.lines().collect::<Vec<_>>(),
        vec![reg.host(), reg.host()],
        "asked for the registry host; once more after the registry refused the first answer"
    );
    assert!(authenticated_blob_gets(&reg) >= 3);
    // A second pull (new blobs are cached; the manifest is asked again) uses the cached answer.
    let r = http::get_manifest(&format!(
        "{}/v2/registry.example/team/app/manifests/v1",
        d.url()
    ));
    assert_eq!(r.status, 200);
    assert_eq!(std::fs::read_to_string(&calls).unwrap().lines().count(), 2);
    let metrics = http::get(&format!("{}/metrics", d.admin_url()))
        .unwrap()
        .text();
    let fetches = "dockside_upstream_credential_fetches_total\
                   {result=\"ok\",source=\"helper\",upstream=\"registry.example\"} 2";
    assert!(metrics.contains(fetches), "{metrics}");
}

#[test]
fn a_failing_credential_helper_is_a_clear_error() {
    let (reg, _img) = registry_with_image(Auth::Basic, "u", "p", 5002);
    let dir = tempfile::tempdir().unwrap();
    let helper = dir.path().join("docker-credential-broken");
    write_executable(
        &helper,
        "#!/bin/sh\necho 'credentials not found in native keychain' >&2\nexit 1\n",
    );
    let cfg = Config::new(vec![upstream_with(
        "registry.example",
        &reg,
        &format!("helper: {}", helper.display()),
    )]);
    let d = Dockside::start(&cfg);
    let r = http::get_manifest(&format!(
        "{}/v2/registry.example/team/app/manifests/v1",
        d.url()
    ));
    assert!(r.status >= 400, "{} {}", r.status, r.snippet());
    assert!(r.error_code().is_some(), "OCI error JSON: {}", r.snippet());
    crate::support::wait_for(
        "the helper's own message in dockside's log",
        std::time::Duration::from_secs(10),
        || {
            d.log()
                .contains("credentials not found in native keychain")
                .then_some(())
        },
    );
}

// ---------------------------------------------------------------------------------------------
// Amazon ECR against moto

/// Which link of the AWS credential chain a test uses.
enum Chain {
    Env,
    Profile,
    WebIdentity,
    Imds,
}

/// moto set up, a registry accepting what moto's ECR hands out, dockside with `ecr:` whose
/// AWS credentials come from `chain`. Returns after one pull and checks moto's view.
fn ecr_pull(chain: Chain) {
    // Web identity costs one unsigned STS call before the checked ECR call.
    let free = moto::SETUP_CALLS + matches!(chain, Chain::WebIdentity) as u32;
    let aws = Moto::start(free);
    let setup = aws.setup();
    assert_eq!(setup.user, "AWS", "ECR's registry user");
    let (reg, img) = registry_with_image(Auth::Basic, &setup.user, &setup.password, 5010);
    let dir = tempfile::tempdir().unwrap();
    let mut env: Vec<(String, String)> = vec![
        ("HOME".into(), dir.path().display().to_string()),
        ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
    ];
    let mut ecr = format!(
        "ecr:\n  region: {}\n  registry_id: \"{}\"\n  endpoint: {}\n  sts_endpoint: {}\n",
        moto::REGION,
        moto::ACCOUNT,
        aws.url(),
        aws.url()
    );
    let mut imds = None;
    match chain {
        Chain::Env => {
            env.push(("AWS_ACCESS_KEY_ID".into(), setup.access_key_id.clone()));
            env.push((
                "AWS_SECRET_ACCESS_KEY".into(),
                setup.secret_access_key.clone(),
            ));
        }
        Chain::Profile => {
            std::fs::create_dir(dir.path().join(".aws")).unwrap();
            std::fs::write(
                dir.path().join(".aws/credentials"),
                format!(
                    "[default]\naws_access_key_id = WRONG\naws_secret_access_key = WRONG\n\n\
                     [ci]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
                    setup.access_key_id, setup.secret_access_key
                ),
            )
            .unwrap();
            env.push(("AWS_PROFILE".into(), "ci".into()));
        }
        Chain::WebIdentity => {
            let token = dir.path().join("web-identity-token");
            std::fs::write(&token, "eyJhbGciOiJSUzI1NiJ9.e30.c2ln\n").unwrap();
            env.push((
                "AWS_WEB_IDENTITY_TOKEN_FILE".into(),
                token.display().to_string(),
            ));
            env.push(("AWS_ROLE_ARN".into(), setup.role_arn.clone()));
        }
        Chain::Imds => {
            env.retain(|(k, _)| k != "AWS_EC2_METADATA_DISABLED");
            let fake = imds_fake(&setup);
            ecr += &format!("  imds_endpoint: {}\n", fake.url());
            imds = Some(fake);
        }
    }
    let mut cfg = Config::new(vec![upstream_with("ecr.example", &reg, &ecr)]);
    cfg.env = env;
    let d = Dockside::start(&cfg);
    pull_oci_and_check(&d, "ecr.example/team/app:v1", &img);
    assert!(authenticated_blob_gets(&reg) >= 3);
    let r = http::get_manifest(&format!("{}/v2/ecr.example/team/app/manifests/v1", d.url()));
    assert_eq!(r.status, 200);
    // Setup's calls, then dockside's: one GetAuthorizationToken (plus one STS call for web
    // identity), signed well enough for moto's SigV4 check and allowed by the IAM policy.
    let expected = free as usize + 1;
    crate::support::wait_for("moto's log", std::time::Duration::from_secs(10), || {
        (aws.posts(200) >= expected).then_some(())
    });
    assert_eq!(
        aws.posts(200),
        expected,
        "moto log:\n{}",
        crate::support::tail(&aws.log(), 20)
    );
    assert_eq!(aws.posts(403), 0);
    if let Some(fake) = imds {
        let paths: Vec<String> = fake
            .requests()
            .iter()
            .map(|r| format!("{} {}", r.method, r.path()))
            .collect();
        assert_eq!(
            paths,
            [
                "PUT /latest/api/token",
                "GET /latest/meta-data/iam/security-credentials/",
                "GET /latest/meta-data/iam/security-credentials/dockside-node"
            ]
        );
    }
}

/// IMDSv2: a session token first, then the role name and its credentials, each with the token.
fn imds_fake(setup: &moto::Setup) -> Endpoint {
    let creds = serde_json::json!({
        "Code": "Success", "Type": "AWS-HMAC", "AccessKeyId": setup.role_key_id,
        "SecretAccessKey": setup.role_secret, "Token": setup.role_token,
        "Expiration": "2099-01-01T00:00:00Z",
    })
    .to_string();
    Endpoint::start("imds", move |r: &Request| {
        match (r.method.as_str(), r.path()) {
            ("PUT", "/latest/api/token")
                if r.header("x-aws-ec2-metadata-token-ttl-seconds").is_some() =>
            {
                (200, "imds-v2-token".into())
            }
            _ if r.header("x-aws-ec2-metadata-token") != Some("imds-v2-token") => {
                (401, String::new())
            }
            ("GET", "/latest/meta-data/iam/security-credentials/") => (200, "dockside-node".into()),
            ("GET", "/latest/meta-data/iam/security-credentials/dockside-node") => {
                (200, creds.clone())
            }
            _ => (404, String::new()),
        }
    })
}

#[test]
fn ecr_with_credentials_from_the_environment() {
    ecr_pull(Chain::Env);
}

#[test]
fn ecr_with_credentials_from_a_profile() {
    ecr_pull(Chain::Profile);
}

#[test]
fn ecr_with_web_identity_as_on_eks() {
    ecr_pull(Chain::WebIdentity);
}

#[test]
fn ecr_with_instance_metadata() {
    ecr_pull(Chain::Imds);
}

#[test]
fn ecr_refuses_a_wrong_secret_key_clearly() {
    let aws = Moto::start(moto::SETUP_CALLS);
    let setup = aws.setup();
    let (reg, _img) = registry_with_image(Auth::Basic, &setup.user, &setup.password, 5011);
    let home = tempfile::tempdir().unwrap();
    let ecr = format!(
        "ecr:\n  region: {}\n  registry_id: \"{}\"\n  endpoint: {}\n",
        moto::REGION,
        moto::ACCOUNT,
        aws.url()
    );
    let mut cfg = Config::new(vec![upstream_with("ecr.example", &reg, &ecr)]);
    cfg.env = vec![
        ("HOME".into(), home.path().display().to_string()),
        ("AWS_ACCESS_KEY_ID".into(), setup.access_key_id.clone()),
        ("AWS_SECRET_ACCESS_KEY".into(), "not-the-secret".into()),
    ];
    let d = Dockside::start(&cfg);
    let r = http::get_manifest(&format!("{}/v2/ecr.example/team/app/manifests/v1", d.url()));
    assert!(r.status >= 400, "{} {}", r.status, r.snippet());
    assert!(r.error_code().is_some());
    // The request's log line is written once the answer is out: wait for it.
    crate::support::wait_for(
        "moto's SignatureDoesNotMatch in dockside's log",
        std::time::Duration::from_secs(10),
        || d.log().contains("SignatureDoesNotMatch").then_some(()),
    );
    assert!(
        !d.log().contains("not-the-secret"),
        "the secret is never logged"
    );
}

// ---------------------------------------------------------------------------------------------
// Google: service-account key and metadata server

/// An RSA key pair from the openssl CLI: (PKCS#8 private PEM, public PEM path).
fn rsa_key(dir: &Path) -> (String, std::path::PathBuf) {
    let key = dir.join("sa-key.pem");
    let public = dir.join("sa-pub.pem");
    let openssl = |args: &[&str]| {
        let out = tools::command("openssl")
            .args(args)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    openssl(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        key.to_str().unwrap(),
    ]);
    openssl(&[
        "pkey",
        "-in",
        key.to_str().unwrap(),
        "-pubout",
        "-out",
        public.to_str().unwrap(),
    ]);
    (std::fs::read_to_string(&key).unwrap(), public)
}

/// Whether `jwt`'s RS256 signature verifies with the public key (openssl CLI).
fn rs256_verifies(jwt: &str, public: &Path, dir: &Path) -> bool {
    let mut parts = jwt.rsplitn(2, '.');
    let (Some(sig), Some(input)) = (parts.next(), parts.next()) else {
        return false;
    };
    let Ok(sig) = URL_SAFE_NO_PAD.decode(sig) else {
        return false;
    };
    let sig_file = dir.join(format!("sig-{}", crate::support::nonce()));
    let input_file = sig_file.with_extension("in");
    std::fs::write(&sig_file, sig).unwrap();
    std::fs::write(&input_file, input).unwrap();
    tools::command("openssl")
        .args(["dgst", "-sha256", "-verify"])
        .arg(public)
        .arg("-signature")
        .arg(&sig_file)
        .arg(&input_file)
        .output()
        .is_ok_and(|o| o.status.success())
}

fn jwt_claims(jwt: &str) -> serde_json::Value {
    let payload = jwt.split('.').nth(1).unwrap_or("");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap_or_default()).unwrap_or_default()
}

#[test]
fn gcp_service_account_key_jwt_is_exchanged_for_an_access_token() {
    const ACCESS: &str = "ya29.e2e-access-token";
    let dir = tempfile::tempdir().unwrap();
    let (private_pem, public) = rsa_key(dir.path());
    let email = "mirror@e2e-project.iam.gserviceaccount.com";
    let work = dir.path().to_path_buf();
    // Google's token endpoint: the assertion must be an RS256 JWT by the key's public half, for
    // this endpoint, from the service account, not expired.
    let token_endpoint = std::sync::Arc::new(std::sync::OnceLock::<String>::new());
    let aud = token_endpoint.clone();
    let fake = Endpoint::start("gcp token", move |r: &Request| {
        let form = r.form();
        let assertion = form.get("assertion").cloned().unwrap_or_default();
        let claims = jwt_claims(&assertion);
        let ok = r.method == "POST"
            && form.get("grant_type").map(String::as_str)
                == Some("urn:ietf:params:oauth:grant-type:jwt-bearer")
            && rs256_verifies(&assertion, &public, &work)
            && claims["iss"] == email
            && claims["aud"].as_str() == aud.get().map(String::as_str)
            && claims["scope"] == "https://www.googleapis.com/auth/cloud-platform"
            && claims["exp"].as_u64().is_some_and(|e| e > unix_now());
        if ok {
            (200, serde_json::json!({"access_token": ACCESS, "expires_in": 3599, "token_type": "Bearer"}).to_string())
        } else {
            (400, r#"{"error":"invalid_grant"}"#.into())
        }
    });
    token_endpoint.set(format!("{}/token", fake.url())).unwrap();
    let key_file = dir.path().join("sa.json");
    std::fs::write(
        &key_file,
        serde_json::json!({
            "type": "service_account", "project_id": "e2e-project", "private_key_id": "k1",
            "private_key": private_pem, "client_email": email, "client_id": "1",
            "token_uri": token_endpoint.get().unwrap(),
        })
        .to_string(),
    )
    .unwrap();
    let (reg, img) = registry_with_image(Auth::Basic, "oauth2accesstoken", ACCESS, 5020);
    let cfg = Config::new(vec![upstream_with(
        "gcr.example",
        &reg,
        &format!("gcp:\n  key_file: {}", key_file.display()),
    )]);
    let d = Dockside::start(&cfg);
    pull_oci_and_check(&d, "gcr.example/team/app:v1", &img);
    assert!(authenticated_blob_gets(&reg) >= 3);
    assert_eq!(fake.requests().len(), 1, "one token for the whole pull");
}

#[test]
fn gcp_metadata_server_token_in_the_registry_token_flow() {
    const ACCESS: &str = "ya29.e2e-metadata-token";
    let fake = Endpoint::start("gce metadata", |r: &Request| {
        match (r.path(), r.header("metadata-flavor")) {
            ("/computeMetadata/v1/instance/service-accounts/default/token", Some("Google")) => (
                200,
                serde_json::json!({"access_token": ACCESS, "expires_in": 3599, "token_type": "Bearer"}).to_string(),
            ),
            _ => (403, String::new()),
        }
    });
    // Artifact Registry answers with a Bearer challenge; the access token is the password at
    // its token endpoint.
    let (reg, img) = registry_with_image(Auth::Token, "oauth2accesstoken", ACCESS, 5021);
    let host = fake.url().trim_start_matches("http://").to_string();
    let mut cfg = Config::new(vec![upstream_with(
        "docker.pkg.example",
        &reg,
        "gcp:\n  metadata: true",
    )]);
    cfg.env.push(("GCE_METADATA_HOST".into(), host));
    let d = Dockside::start(&cfg);
    pull_oci_and_check(&d, "docker.pkg.example/team/app:v1", &img);
    let ts = reg.token.as_ref().unwrap();
    let asked: Vec<_> = ts
        .requests()
        .into_iter()
        .filter(|r| r.account.is_some())
        .collect();
    assert!(!asked.is_empty());
    assert!(
        asked
            .iter()
            .all(|r| r.granted && r.account.as_deref() == Some("oauth2accesstoken")),
        "{asked:?}"
    );
    assert_eq!(fake.requests().len(), 1);
}

// ---------------------------------------------------------------------------------------------
// Azure: AAD token exchanged for an ACR refresh token

const AAD: &str = "aad-access-token-e2e";

/// An ACR-like registry (token auth) whose token server accepts the refresh token a fake
/// `/oauth2/exchange` hands out for the AAD token [`AAD`]; dockside configured with the `acr:`
/// block `acr_yaml(exchange URL)` and `env` pulls through it.
fn acr_pull(acr_yaml: impl Fn(&str) -> String, env: Vec<(String, String)>) {
    // ACR refresh tokens are JWTs; dockside reads their `exp` to know when to exchange again.
    let claims = URL_SAFE_NO_PAD.encode(format!(r#"{{"exp":{}}}"#, unix_now() + 3 * 3600));
    let refresh = format!("eyJhbGciOiJSUzI1NiJ9.{claims}.c2ln");
    let (reg, img) = registry_with_image(
        Auth::Token,
        "00000000-0000-0000-0000-000000000000",
        &refresh,
        5030,
    );
    let expected_service = "127.0.0.1";
    let answer = refresh.clone();
    // The first exchange hands out a token the registry's token server refuses (as a revoked
    // one would be): dockside must exchange again and go on with the new one.
    let exchanges = std::sync::atomic::AtomicUsize::new(0);
    let fake = Endpoint::start("acr exchange", move |r: &Request| {
        let f = r.form();
        let field = |k: &str| f.get(k).map(String::as_str);
        if r.method == "POST"
            && r.path() == "/oauth2/exchange"
            && field("grant_type") == Some("access_token")
            && field("service") == Some(expected_service)
            && field("tenant") == Some("e2e-tenant")
            && field("access_token") == Some(AAD)
        {
            (200, {
                let first = exchanges.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0;
                let token = if first { "revoked.e30.c2ln" } else { &answer };
                serde_json::json!({ "refresh_token": token }).to_string()
            })
        } else {
            (401, r#"{"errors":[{"code":"UNAUTHORIZED"}]}"#.into())
        }
    });
    let mut cfg = Config::new(vec![upstream_with(
        "e2e.azurecr.example",
        &reg,
        &acr_yaml(&format!("{}/oauth2/exchange", fake.url())),
    )]);
    cfg.env = env;
    let d = Dockside::start(&cfg);
    pull_oci_and_check(&d, "e2e.azurecr.example/team/app:v1", &img);
    assert_eq!(
        fake.requests().len(),
        2,
        "exchanged again after the refusal"
    );
    let ts = reg.token.as_ref().unwrap();
    let asked: Vec<_> = ts
        .requests()
        .into_iter()
        .filter(|r| r.account.as_deref() == Some("00000000-0000-0000-0000-000000000000"))
        .collect();
    let refused = asked.iter().filter(|r| !r.granted).count();
    assert_eq!(refused, 1, "only the revoked token was refused: {asked:?}");
    assert!(asked.len() > refused, "{asked:?}");
}

#[test]
fn acr_exchanges_an_aad_token_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("aad-token");
    std::fs::write(&token_file, format!("{AAD}\n")).unwrap();
    acr_pull(
        |exchange| {
            format!(
                "acr:\n  tenant: e2e-tenant\n  aad_token_file: {}\n  exchange_url: {exchange}",
                token_file.display()
            )
        },
        Vec::new(),
    );
}

#[test]
fn acr_with_aks_workload_identity() {
    const FEDERATED: &str = "eyJhbGciOiJSUzI1NiJ9.federated.c2ln";
    // Azure AD: client credentials with the federated token as the assertion.
    let aad = Endpoint::start("azure ad", |r: &Request| {
        let f = r.form();
        let field = |k: &str| f.get(k).map(String::as_str);
        let ok = r.method == "POST"
            && r.path() == "/e2e-tenant/oauth2/v2.0/token"
            && field("grant_type") == Some("client_credentials")
            && field("client_id") == Some("e2e-client-id")
            && field("scope") == Some("https://management.azure.com/.default")
            && field("client_assertion_type")
                == Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
            && field("client_assertion") == Some(FEDERATED);
        if ok {
            let answer = serde_json::json!({"access_token": AAD, "expires_in": 3599, "token_type": "Bearer"});
            (200, answer.to_string())
        } else {
            (400, r#"{"error":"invalid_client"}"#.into())
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let federated = dir.path().join("azure-identity-token");
    std::fs::write(&federated, FEDERATED).unwrap();
    let env = [
        (
            "AZURE_FEDERATED_TOKEN_FILE",
            federated.display().to_string(),
        ),
        ("AZURE_CLIENT_ID", "e2e-client-id".into()),
        ("AZURE_TENANT_ID", "e2e-tenant".into()),
        ("AZURE_AUTHORITY_HOST", format!("{}/", aad.url())),
    ];
    acr_pull(
        |exchange| format!("acr:\n  workload_identity: true\n  exchange_url: {exchange}"),
        env.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
    );
    assert_eq!(aad.requests().len(), 2, "one AAD token per exchange");
}

// ---------------------------------------------------------------------------------------------
// GHCR / Quay / GitLab: a personal access token in the standard token flow

#[test]
fn personal_access_token_goes_to_the_realm_and_the_bearer_to_the_registry() {
    let pat = format!("ghp_{}", crate::support::nonce());
    let (reg, img) = registry_with_image(Auth::Token, "octocat", &pat, 5040);
    let ts = reg.token.as_ref().unwrap();
    ts.clear();
    let up = Upstream {
        username: Some("octocat".into()),
        password: Some(pat.clone()),
        ..Upstream::new("ghcr.io", &reg)
    };
    let d = Dockside::start(&Config::new(vec![up]));
    pull_oci_and_check(&d, "ghcr.io/team/app:v1", &img);
    let asked = ts.requests();
    assert!(!asked.is_empty());
    for r in &asked {
        assert!(
            r.granted,
            "the PAT was accepted as Basic at the realm: {r:?}"
        );
        assert_eq!(r.account.as_deref(), Some("octocat"));
    }
    // The registry only takes bearer tokens: every 200 below was made with the realm's token.
    let log = reg.access_log();
    assert!(count(&log, "GET", "/v2/team/app/manifests/v1") >= 1);
    assert!(authenticated_blob_gets(&reg) >= 3);
}
