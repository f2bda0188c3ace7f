// NEVER BUILT: no Android SDK on the machine this was written on (see android_demo/README.md).
plugins {
    id("com.android.application")
    kotlin("android")
}

// The ONNX Runtime the app ships. A bundle names the oldest release that runs its graph
// (manifest onnx.min_onnxruntime; the default int4 bundle needs 1.27.0) and OrtForward refuses a
// bundle that needs a newer one. 1.32.0 is the release the Python runtime's tests ran on; its
// Android package was not resolved here (no Maven Central on the machine this was written on).
val onnxruntimeVersion = "1.32.0"

android {
    namespace = "dev.nomoat.app"
    compileSdk = 34

    defaultConfig {
        applicationId = "dev.nomoat.app"
        minSdk = 26
        targetSdk = 34
        versionCode = 1
        versionName = "0.1"
        // ONNX Runtime's Android package ships arm64-v8a, armeabi-v7a, x86 and x86_64 libraries;
        // phones are arm64. Keep the APK to that.
        ndk { abiFilters += listOf("arm64-v8a") }
        buildConfigField("String", "ONNXRUNTIME_VERSION", "\"$onnxruntimeVersion\"")
    }
    buildFeatures { buildConfig = true }

    buildTypes {
        release {
            isMinifyEnabled = false
            // Debug-signed so `gradle :app:assembleRelease` gives an installable APK for a demo;
            // sign with your own key for anything else.
            signingConfig = signingConfigs.getByName("debug")
        }
    }

    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_1_8
        targetCompatibility = JavaVersion.VERSION_1_8
    }
    kotlinOptions { jvmTarget = "1.8" }
    sourceSets["main"].java.srcDirs("src/main/kotlin")
}

dependencies {
    implementation(project(":core"))
    // OrtSession.run(inputs, pinnedOutputs), which OrtForward uses to share the KV cache, is 1.16+.
    implementation("com.microsoft.onnxruntime:onnxruntime-android:$onnxruntimeVersion")
}
