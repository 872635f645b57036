// A small OpenTelemetry Collector app that receives rtpd's OTLP metrics and
// exports them to Application Insights (customMetrics). Needed because the
// environment's managed OpenTelemetry agent does not send metrics to
// Application Insights. Internal ingress only: reachable from the apps in the
// environment, not from the internet.
//
// The configuration is bicep/otel-collector-azure.yaml, handed to the collector
// in an environment variable (its `env:` config provider), so no file share
// is needed.

param location string
param name string
param environmentId string

@description('OpenTelemetry Collector contrib image (it has the azuremonitor exporter).')
param image string

@secure()
param appInsightsConnectionString string

var otlpHttpPort = 4318
var healthPort = 13133

resource collector 'Microsoft.App/containerApps@2026-07-01' = {
  name: name
  location: location
  properties: {
    environmentId: environmentId
    workloadProfileName: 'Consumption'
    configuration: {
      activeRevisionsMode: 'Single'
      ingress: {
        external: false
        targetPort: otlpHttpPort
        transport: 'http'
        allowInsecure: false
      }
      secrets: [
        {
          name: 'appinsights-connection-string'
          value: appInsightsConnectionString
        }
      ]
    }
    template: {
      containers: [
        {
          name: 'otelcol'
          image: image
          args: [
            '--config=env:OTELCOL_CONFIG'
          ]
          env: [
            {
              name: 'OTELCOL_CONFIG'
              value: loadTextContent('../otel-collector-azure.yaml')
            }
            {
              name: 'APPLICATIONINSIGHTS_CONNECTION_STRING'
              secretRef: 'appinsights-connection-string'
            }
          ]
          resources: {
            cpu: json('0.25')
            memory: '0.5Gi'
          }
          probes: [
            {
              type: 'Liveness'
              httpGet: {
                path: '/'
                port: healthPort
              }
              periodSeconds: 10
              timeoutSeconds: 3
              failureThreshold: 3
            }
            {
              type: 'Readiness'
              httpGet: {
                path: '/'
                port: healthPort
              }
              periodSeconds: 10
              timeoutSeconds: 3
              failureThreshold: 3
            }
          ]
        }
      ]
      scale: {
        minReplicas: 1
        maxReplicas: 2
      }
    }
  }
}

@description('Full OTLP/HTTP metrics URL (per-signal endpoints are used as given).')
output otlpMetricsUrl string = 'https://${collector.properties.configuration.ingress.fqdn}/v1/metrics'
