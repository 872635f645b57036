// The two container apps, both running the rtpd image:
//   api        `rtpd api`: external HTTPS ingress (optional IP allow-list and
//              client-certificate mode), >= 2 replicas
//   processor  `rtpd processor`: no ingress, >= 1 replica, scaled by KEDA on the queue length
// Both have startup (/healthz), liveness (/healthz) and readiness (/readyz) probes.
//
// Secrets: the Key Vault secrets are Container Apps secrets (by versionless
// URL, through the app identity) mounted as files under /run/secrets/rtpd;
// rtpd reads RTPD_VENDOR_KEYS_FILE / RTPD_ADMIN_TOKENS_FILE. HMAC vendor
// secrets may only come from a file. The processor gets the admin tokens only.
//
// tests/deploy/check_deploy.py evaluates the env arrays below (variables,
// concat, conditionals) and checks every name against the variables rtpd
// reads; keep each entry a plain { name, value | secretRef } object.

param location string
param environmentId string

param apiAppName string
param processorAppName string

@description('Container image, e.g. myregistry.azurecr.io/rtpd:1.4.0.')
param image string

@description('Registry to pull from with the app identity (needs AcrPull there); empty for a public image.')
param registryServer string

param appIdentityId string
param appClientId string
param appPrincipalId string
param appIdentityName string
param scalerIdentityId string

param storageAccountUrl string
param walContainerName string

@allowed([
  'redis'
  'postgres'
])
param ledger string
param redisHostName string
param redisPort int
param postgresHostName string
param postgresDatabaseName string

param serviceBusNamespaceName string
param serviceBusFqdn string
param queueName string
param queueLockDurationSecs int

param downstreamUrl string
param maxRetries int
param backoffBaseSecs int
param backoffMaxSecs int
param logLevel string

param vendorKeysSecretUrl string
param adminTokensSecretUrl string

@description('OTLP/HTTP URL for rtpd\'s metrics (the collector app); empty: metrics are not exported.')
param metricsEndpoint string

@description('{ name, ipAddressRange, description } entries allowed to reach the api; empty allows all.')
param apiIpAllowList array

@allowed([
  'ignore'
  'accept'
  'require'
])
param apiClientCertificateMode string

@description('RTPD_TRUSTED_PROXIES of the api: the ingress\'s source ranges, comma separated; empty: none.')
param apiTrustedProxies string

@minValue(2)
param apiMinReplicas int
param apiMaxReplicas int
param apiConcurrentRequests int

@minValue(1)
param processorMinReplicas int
param processorMaxReplicas int
param processorMessagesPerReplica int

var httpPort = 8080
var secretsVolumeName = 'rtpd-secrets'
var secretsMountPath = '/run/secrets/rtpd'
var apiServiceName = 'rtpd-api'
var processorServiceName = 'rtpd-processor'

var vendorKeysSecret = {
  name: 'vendor-keys'
  keyVaultUrl: vendorKeysSecretUrl
  identity: appIdentityId
}
var adminTokensSecret = {
  name: 'admin-tokens'
  keyVaultUrl: adminTokensSecretUrl
  identity: appIdentityId
}

// One file per secret, named like the secret. The platform re-fetches a
// versionless Key Vault secret within 30 minutes of a rotation; rtpd re-reads
// the files on change or SIGHUP (docs/deploy.md, "Rotating a secret").
var apiSecretsVolume = {
  name: secretsVolumeName
  storageType: 'Secret'
  secrets: [
    {
      secretRef: 'vendor-keys'
      path: 'vendor-keys'
    }
    {
      secretRef: 'admin-tokens'
      path: 'admin-tokens'
    }
  ]
}
var processorSecretsVolume = {
  name: secretsVolumeName
  storageType: 'Secret'
  secrets: [
    {
      secretRef: 'admin-tokens'
      path: 'admin-tokens'
    }
  ]
}
var secretsMount = {
  volumeName: secretsVolumeName
  mountPath: secretsMountPath
}

var registry = {
  server: registryServer
  identity: appIdentityId
}
var registries = empty(registryServer) ? [] : [registry]

var redisLedgerEnv = [
  {
    // The user name is the identity's object id, as Azure Managed Redis expects
    // for Entra ID; the password is a token rtpd fetches and renews.
    name: 'RTPD_REDIS_URL'
    value: 'rediss://${appPrincipalId}@${redisHostName}:${redisPort}'
  }
  {
    name: 'RTPD_REDIS_ENTRA'
    value: 'true'
  }
]
var postgresLedgerEnv = [
  {
    // The role is named after the app identity (created once by an Entra
    // administrator, docs/deploy.md); the password is an Entra token rtpd
    // fetches and renews.
    name: 'RTPD_POSTGRES_URL'
    value: 'postgres://${appIdentityName}@${postgresHostName}:5432/${postgresDatabaseName}?sslmode=require'
  }
  {
    name: 'RTPD_POSTGRES_ENTRA'
    value: 'true'
  }
]
var ledgerEnv = ledger == 'postgres' ? postgresLedgerEnv : redisLedgerEnv

// Standard OpenTelemetry variables only. OTEL_EXPORTER_OTLP_ENDPOINT and
// OTEL_EXPORTER_OTLP_PROTOCOL (grpc) are injected by the environment's managed
// agent (traces, logs -> Application Insights); metrics go to the collector app.
var metricsEnv = empty(metricsEndpoint) ? [] : [
  {
    name: 'OTEL_EXPORTER_OTLP_METRICS_ENDPOINT'
    value: metricsEndpoint
  }
  {
    name: 'OTEL_EXPORTER_OTLP_METRICS_PROTOCOL'
    value: 'http/protobuf'
  }
]

var sharedEnv = [
  {
    name: 'RTPD_HTTP_ADDR'
    value: '0.0.0.0:${httpPort}'
  }
  {
    name: 'RTPD_LOG_FORMAT'
    value: 'json'
  }
  {
    name: 'RTPD_LOG_LEVEL'
    value: logLevel
  }
  {
    // The standard Azure SDK variable: two identities are attached to the
    // processor, and this one is rtpd's.
    name: 'AZURE_CLIENT_ID'
    value: appClientId
  }
  {
    name: 'RTPD_WAL'
    value: 'azure'
  }
  {
    name: 'RTPD_STORAGE_ACCOUNT_URL'
    value: storageAccountUrl
  }
  {
    name: 'RTPD_WAL_CONTAINER'
    value: walContainerName
  }
  {
    // Created by storage.bicep under a WORM policy; the app identity cannot create containers.
    name: 'RTPD_WAL_CREATE_CONTAINER'
    value: 'false'
  }
  {
    name: 'RTPD_LEDGER'
    value: ledger
  }
  {
    name: 'RTPD_QUEUE'
    value: 'servicebus'
  }
  {
    name: 'RTPD_SERVICEBUS_NAMESPACE'
    value: serviceBusFqdn
  }
  {
    name: 'RTPD_SERVICEBUS_QUEUE'
    value: queueName
  }
  {
    name: 'RTPD_LOCK_DURATION_SECS'
    value: string(queueLockDurationSecs)
  }
  {
    name: 'RTPD_DOWNSTREAM_URL'
    value: downstreamUrl
  }
  {
    name: 'RTPD_MAX_RETRIES'
    value: string(maxRetries)
  }
  {
    name: 'RTPD_BACKOFF_BASE_SECS'
    value: string(backoffBaseSecs)
  }
  {
    name: 'RTPD_BACKOFF_MAX_SECS'
    value: string(backoffMaxSecs)
  }
  {
    name: 'RTPD_AUTH'
    value: 'keys'
  }
  {
    name: 'RTPD_ADMIN_TOKENS_FILE'
    value: '${secretsMountPath}/admin-tokens'
  }
  {
    // Platform probes carry no credentials: /healthz and /readyz are open.
    name: 'RTPD_PUBLIC_HEALTH'
    value: 'true'
  }
  {
    // /metrics and /status stay admin-only; metrics leave over OTLP.
    name: 'RTPD_PUBLIC_METRICS'
    value: 'false'
  }
]

// Behind Envoy every caller has Envoy's address; with its ranges trusted,
// the per-address limits key on the client it appends to X-Forwarded-For.
// Envoy is the one proxy in front: the client is the entry it appends
// (RTPD_TRUSTED_PROXY_HOPS=1), so another app inside the trusted range cannot
// name an address of its choice.
var trustedProxiesEnv = empty(apiTrustedProxies) ? [] : [
  {
    name: 'RTPD_TRUSTED_PROXIES'
    value: apiTrustedProxies
  }
  {
    name: 'RTPD_TRUSTED_PROXY_HOPS'
    value: '1'
  }
]

var apiEnv = [
  {
    name: 'RTPD_VENDOR_KEYS_FILE'
    value: '${secretsMountPath}/vendor-keys'
  }
  {
    name: 'OTEL_SERVICE_NAME'
    value: apiServiceName
  }
]

var processorEnv = [
  {
    name: 'OTEL_SERVICE_NAME'
    value: processorServiceName
  }
]

// Startup gates the other two, so liveness needs no initial delay: a replica
// gets up to 30 s to answer /healthz before it is restarted.
var startupProbe = {
  type: 'Startup'
  httpGet: {
    path: '/healthz'
    port: httpPort
  }
  initialDelaySeconds: 1
  periodSeconds: 3
  timeoutSeconds: 3
  failureThreshold: 10
}

// The process answers: restart it only when it does not.
var livenessProbe = {
  type: 'Liveness'
  httpGet: {
    path: '/healthz'
    port: httpPort
  }
  periodSeconds: 10
  timeoutSeconds: 3
  failureThreshold: 3
}

// What this replica can do right now; the api keeps answering vendors with
// its own 503 + Retry-After while a backend blips.
var readinessProbe = {
  type: 'Readiness'
  httpGet: {
    path: '/readyz'
    port: httpPort
  }
  periodSeconds: 5
  timeoutSeconds: 3
  failureThreshold: 3
}

resource api 'Microsoft.App/containerApps@2026-07-01' = {
  name: apiAppName
  location: location
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${appIdentityId}': {}
    }
  }
  properties: {
    environmentId: environmentId
    workloadProfileName: 'Consumption'
    configuration: {
      activeRevisionsMode: 'Single'
      ingress: {
        external: true
        targetPort: httpPort
        transport: 'auto'
        allowInsecure: false
        // Allow rules only (Container Apps takes all-allow or all-deny); none = open.
        ipSecurityRestrictions: [
          for rule in apiIpAllowList: {
            name: rule.name
            description: rule.?description ?? ''
            ipAddressRange: rule.ipAddressRange
            action: 'Allow'
          }
        ]
        clientCertificateMode: apiClientCertificateMode
      }
      secrets: [
        vendorKeysSecret
        adminTokensSecret
      ]
      registries: registries
    }
    template: {
      containers: [
        {
          name: 'api'
          image: image
          args: [
            'api'
          ]
          env: concat(sharedEnv, ledgerEnv, metricsEnv, trustedProxiesEnv, apiEnv)
          volumeMounts: [
            secretsMount
          ]
          resources: {
            cpu: json('0.5')
            memory: '1Gi'
          }
          probes: [
            startupProbe
            livenessProbe
            readinessProbe
          ]
        }
      ]
      volumes: [
        apiSecretsVolume
      ]
      scale: {
        minReplicas: apiMinReplicas
        maxReplicas: apiMaxReplicas
        rules: [
          {
            name: 'http-concurrency'
            http: {
              metadata: {
                concurrentRequests: string(apiConcurrentRequests)
              }
            }
          }
        ]
      }
    }
  }
}

resource processor 'Microsoft.App/containerApps@2026-07-01' = {
  name: processorAppName
  location: location
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${appIdentityId}': {}
      '${scalerIdentityId}': {}
    }
  }
  properties: {
    environmentId: environmentId
    workloadProfileName: 'Consumption'
    configuration: {
      activeRevisionsMode: 'Single'
      // No ingress: the processor only pulls from the queue. /healthz and
      // /readyz are still served on the container port for the probes.
      secrets: [
        adminTokensSecret
      ]
      registries: registries
    }
    template: {
      containers: [
        {
          name: 'processor'
          image: image
          args: [
            'processor'
          ]
          env: concat(sharedEnv, ledgerEnv, metricsEnv, processorEnv)
          volumeMounts: [
            secretsMount
          ]
          resources: {
            cpu: json('0.5')
            memory: '1Gi'
          }
          probes: [
            startupProbe
            livenessProbe
            readinessProbe
          ]
        }
      ]
      volumes: [
        processorSecretsVolume
      ]
      scale: {
        // Never zero: scheduled retries and the reconciler need a running processor.
        minReplicas: processorMinReplicas
        maxReplicas: processorMaxReplicas
        rules: [
          {
            name: 'servicebus-queue-length'
            custom: {
              type: 'azure-servicebus'
              metadata: {
                namespace: serviceBusNamespaceName
                queueName: queueName
                messageCount: string(processorMessagesPerReplica)
              }
              // Managed identity instead of a connection string (none exists: local auth is off).
              identity: scalerIdentityId
            }
          }
        ]
      }
    }
  }
}

output apiFqdn string = api.properties.configuration.ingress.fqdn
output apiUrl string = 'https://${api.properties.configuration.ingress.fqdn}'
output processorName string = processor.name
@description('OTEL_SERVICE_NAME of the api: cloud_RoleName in Application Insights.')
output apiServiceName string = apiServiceName
output processorServiceName string = processorServiceName
