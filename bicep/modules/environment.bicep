// The Container Apps environment: platform logs to Log Analytics, and the
// managed OpenTelemetry agent sending rtpd's traces and logs to Application
// Insights. The agent injects OTEL_EXPORTER_OTLP_ENDPOINT (gRPC) into every app.
// Application Insights does not take metrics from the agent; rtpd's OTLP
// metrics go to the collector app in otel-collector.bicep instead.

param location string
param environmentName string
param logAnalyticsName string
param appInsightsConnectionString string

resource logs 'Microsoft.OperationalInsights/workspaces@2025-07-01' existing = {
  name: logAnalyticsName
}

resource appsEnvironment 'Microsoft.App/managedEnvironments@2026-07-01' = {
  name: environmentName
  location: location
  properties: {
    appLogsConfiguration: {
      destination: 'log-analytics'
      logAnalyticsConfiguration: {
        customerId: logs.properties.customerId
        sharedKey: logs.listKeys().primarySharedKey
      }
    }
    appInsightsConfiguration: {
      connectionString: appInsightsConnectionString
    }
    openTelemetryConfiguration: {
      tracesConfiguration: {
        destinations: [
          'appInsights'
        ]
      }
      logsConfiguration: {
        destinations: [
          'appInsights'
        ]
      }
    }
    workloadProfiles: [
      {
        name: 'Consumption'
        workloadProfileType: 'Consumption'
      }
    ]
    // Zone redundancy needs a VNet-integrated environment (infrastructureSubnetId);
    // see docs/deploy.md, "Not covered here".
    zoneRedundant: false
  }
}

output environmentId string = appsEnvironment.id
output defaultDomain string = appsEnvironment.properties.defaultDomain
