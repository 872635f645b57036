// The two container apps, both running the rtpd image:
//   api        `rtpd api`: external HTTPS ingress, >= 2 replicas, probes on /healthz and /readyz
//   processor  `rtpd processor`: no ingress, >= 1 replica, scaled by KEDA on the queue length
//
// Both get the same RTPD_* settings (sharedEnv). tests/deploy/check_deploy.py
// reads the `name: 'RTPD_...'` entries below and checks them against the
// variables rtpd reads; keep each entry a plain { name, value | secretRef } object.

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
param scalerIdentityId string

param storageAccountUrl string
param walContainerName string
param redisHostName string
param redisPort int
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

@minValue(2)
param apiMinReplicas int
param apiMaxReplicas int
param apiConcurrentRequests int

@minValue(1)
param processorMinReplicas int
param processorMaxReplicas int
param processorMessagesPerReplica int

var httpPort = 8080

var secrets = [
  {
    name: 'vendor-keys'
    keyVaultUrl: vendorKeysSecretUrl
    identity: appIdentityId
  }
  {
    name: 'admin-tokens'
    keyVaultUrl: adminTokensSecretUrl
    identity: appIdentityId
  }
]

var registry = {
  server: registryServer
  identity: appIdentityId
}
var registries = empty(registryServer) ? [] : [registry]

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
    // Two identities are attached to the processor; this one is rtpd's.
    name: 'RTPD_AZURE_CLIENT_ID'
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
    value: 'redis'
  }
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
    name: 'RTPD_VENDOR_KEYS'
    secretRef: 'vendor-keys'
  }
  {
    name: 'RTPD_ADMIN_TOKENS'
    secretRef: 'admin-tokens'
  }
  {
    // Platform probes carry no credentials.
    name: 'RTPD_PUBLIC_HEALTH'
    value: 'true'
  }
]

var livenessProbe = {
  type: 'Liveness'
  httpGet: {
    path: '/healthz'
    port: httpPort
  }
  initialDelaySeconds: 5
  periodSeconds: 10
  timeoutSeconds: 3
  failureThreshold: 3
}

resource api 'Microsoft.App/containerApps@2025-01-01' = {
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
      }
      secrets: secrets
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
          env: sharedEnv
          resources: {
            cpu: json('0.5')
            memory: '1Gi'
          }
          probes: [
            livenessProbe
            {
              type: 'Readiness'
              httpGet: {
                path: '/readyz'
                port: httpPort
              }
              periodSeconds: 5
              timeoutSeconds: 3
              failureThreshold: 3
            }
          ]
        }
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

resource processor 'Microsoft.App/containerApps@2025-01-01' = {
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
      // No ingress: the processor only pulls from the queue. /healthz is still
      // served on the container port for the liveness probe.
      secrets: secrets
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
          env: sharedEnv
          resources: {
            cpu: json('0.5')
            memory: '1Gi'
          }
          probes: [
            livenessProbe
          ]
        }
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
